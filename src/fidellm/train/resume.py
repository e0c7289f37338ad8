"""What a resumed run may change, checked against the checkpoint's saved train config before any step.

A checkpoint stores the train config and the number of processes it was written with. Resuming with
other settings falls in three kinds:
- what the data position and the saved state depend on (sequence length, rows per global step, seed,
  the data itself; the base model, LoRA, unfreezing, the optimizer and its stage groups, whether a weight
  average is kept): refused, naming each field, since the run would otherwise repeat or skip data, load
  state into the wrong places, or compare train/best across trained and averaged weights;
- the optimization trajectory (steps, schedule, lr, weight decay, betas, clipping, dtype, accumulation,
  document masking, the weight average's decay while one is kept): honored and reported, since the run
  then differs from an uninterrupted one;
- everything else (logging, evaluation and save cadence, device, compile, stop_at_step, …): free.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fidellm.errors import FidelError

POSITION_FIELDS = ("seq_len", "seed", "data", "chat_dir", "max_samples", "curriculum", "curriculum_span")
"""The data order is a function of these and of the rows per global step (batch_size × processes)."""
STRUCTURE_FIELDS = ("base", "lora", "unfreeze", "optimizer")
TRAJECTORY_FIELDS = (
    "max_steps", "lr", "schedule", "warmup_steps", "min_lr_ratio", "decay_fraction", "weight_decay",
    "beta1", "beta2", "grad_clip", "dtype", "grad_accum", "document_mask", "stage_lr_multipliers",
    "ema_decay",
)  # fmt: skip
ROWS = "batch_size × processes"

Change = tuple[Any, Any]


def plain(value: Any) -> Any:
    """`value` as it reads back from a JSON state file (tuples become lists, keys strings)."""
    return json.loads(json.dumps(value))


def _differences(saved: dict[str, Any], current: dict[str, Any], names: tuple[str, ...]) -> dict[str, Change]:
    """Fields of `names` whose saved value differs from the current one (fields a checkpoint lacks are
    skipped: it predates them)."""
    return {
        name: (saved[name], current.get(name))
        for name in names
        if name in saved and saved[name] != current.get(name)
    }


def same_path(first: Any, second: Any) -> bool:
    """Whether two saved paths (strings) name the same file, however each was spelled."""
    return (
        isinstance(first, str) and isinstance(second, str) and Path(first).resolve() == Path(second).resolve()
    )


def describe(changes: dict[str, Change]) -> str:
    """Changes as "seq_len 256 → 512, lr 0.003 → 0.001"."""

    def shown(name: str, value: Any) -> str:
        return value if name == ROWS else json.dumps(value)  # rows come as "4 × 2 = 8"

    return ", ".join(
        f"{name} {shown(name, old)} → {shown(name, new)}" for name, (old, new) in changes.items()
    )


def check_model_config(checkpoint: Path, saved: Any, current: dict[str, Any]) -> None:
    """A FidelError naming the fields in which this run's model config differs from the checkpoint's."""
    current = plain(current)
    if saved == current:
        return
    if not isinstance(saved, dict):
        raise FidelError(f"{checkpoint}: its model_config is not a JSON object; start a new run dir")
    names = dict.fromkeys([*saved, *current])
    changed = {
        name: (saved.get(name), current.get(name)) for name in names if saved.get(name) != current.get(name)
    }
    raise FidelError(
        f"{checkpoint}: its model config differs from this run's ({describe(changed)}); pass the"
        " checkpoint's model settings, or a new run dir"
    )


def resume_changes(
    checkpoint: Path,
    saved: dict[str, Any] | None,
    saved_processes: int | None,
    current: dict[str, Any],
    processes: int,
    run_dir: Path,
) -> dict[str, Change]:
    """The honored trajectory changes of resuming `checkpoint` (its train config `saved`, written by
    `saved_processes`) with the train config `current` on `processes`; a FidelError naming every field
    that cannot change. A checkpoint without a saved train config is not checked."""
    if not isinstance(saved, dict):
        return {}
    current = plain(current)
    saved = {"optimizer": "adamw", "ema_decay": None, **saved}  # what checkpoints from before them had
    if same_path(saved.get("base"), current.get("base")):
        saved = {**saved, "base": current.get("base")}
    refused = _differences(saved, current, POSITION_FIELDS + STRUCTURE_FIELDS)
    if isinstance(saved.get("batch_size"), int) and isinstance(saved_processes, int):
        rows = (saved["batch_size"] * saved_processes, current["batch_size"] * processes)
        if rows[0] != rows[1]:
            refused[ROWS] = (
                f"{saved['batch_size']} × {saved_processes} = {rows[0]}",
                f"{current['batch_size']} × {processes} = {rows[1]}",
            )
    trajectory = _differences(saved, current, TRAJECTORY_FIELDS)
    multipliers = trajectory.get("stage_lr_multipliers")
    if multipliers is not None and (not multipliers[0] or not multipliers[1]):  # other optimizer groups
        refused["stage_lr_multipliers"] = trajectory.pop("stage_lr_multipliers")
    average = trajectory.get("ema_decay")
    if average is not None and None in average:  # train/best was scored on the other kind of weights
        refused["ema_decay"] = trajectory.pop("ema_decay")
    if refused:
        raise FidelError(
            f"{checkpoint}: cannot resume with {describe(refused)} (the data position or the saved state"
            f" depends on {'it' if len(refused) == 1 else 'them'}). Pass the checkpoint's values, or start"
            f" a new run dir from its weights with --base {run_dir}"
        )
    return trajectory


def check_data_rows(checkpoint: Path, saved: Any, rows: int, data: Path, run_dir: Path) -> None:
    """A FidelError when the training rows (windows or conversations) of `data` now number other than
    when `checkpoint` was saved (re-tokenized or new data): its data position would index another order.
    A checkpoint without the count (older) is not checked."""
    if isinstance(saved, int) and saved != rows:
        raise FidelError(
            f"{checkpoint}: the training data changed since (it made {saved:,} rows, {data} now makes"
            f" {rows:,}), so its data position no longer points where the run stopped. Restore that data,"
            f" or start a new run dir from its weights with --base {run_dir}"
        )


def check_last_step(checkpoint: Path, step: int, max_steps: int, stop_at_step: int | None) -> None:
    """A FidelError when the checkpoint is already past this run's last step (nothing would happen)."""
    last = min(max_steps, stop_at_step or max_steps)
    if step > last:
        stop = f", --stop-at-step {stop_at_step}" if stop_at_step else ""
        raise FidelError(
            f"{checkpoint} is at step {step}, past this run's last step {last} (--steps {max_steps}{stop}):"
            " raise them to train on"
        )


def resume_notice(checkpoint: Path, step: int, last: int, changes: dict[str, Change]) -> str:
    """What a resumed run prints: where it starts, what changed, and whether anything is left to do."""
    lines = [f"resuming from {checkpoint} (step {step})"]
    if changes:
        lines.append(
            f"changed since that checkpoint (the run now differs from an uninterrupted one):"
            f" {describe(changes)}"
        )
    if step == last:
        lines.append(f"step {step} is already this run's last: nothing to train")
    return "\n".join(lines)
