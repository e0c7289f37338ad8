"""The training engine: packed data, optimizer and schedules, atomic checkpoints, monitoring, the loop."""
