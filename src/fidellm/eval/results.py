"""One shape for every evaluation figure, so the eval CLI, results.json and the report card agree.

A `TaskResult` is one metric of one task on one split: its value, how many items it rests on, and
whatever a reader needs to trust it (per-class scores, the prompt format, seeds). `provenance()`
records where a number came from: commit, hardware, torch version and wall time.
"""

from __future__ import annotations

import dataclasses
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULTS_FILE = "results.json"
"""What `fidellm eval` writes in its output directory (and `fidellm report` reads)."""


@dataclass
class TaskResult:
    """`metric` of `task` on `split` = `value` over `n` items (higher_is_better says which way is good)."""

    task: str
    metric: str
    value: float
    n: int
    split: str = "test"
    higher_is_better: bool = True
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskResult:
        return cls(**data)


def git_commit(directory: Path | None = None) -> str | None:
    """The checkout's short commit (+dirty when tracked files changed), or None outside git."""
    cwd = directory or Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=cwd, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, cwd=cwd
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def cpu_name() -> str:
    """The processor's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware() -> str:
    """The device the figures were computed on, in words."""
    import torch  # here, not at the top: `fidellm report` imports this module and needs no torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU {cpu_name()}, {torch.get_num_threads()} threads"


def provenance(started: float) -> dict[str, Any]:
    """Commit, hardware, versions and wall time since `started` (a time.perf_counter() value)."""
    import torch

    return {
        "commit": git_commit(),
        "hardware": hardware(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "wall_seconds": round(time.perf_counter() - started, 2),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
