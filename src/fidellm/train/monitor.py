"""Training telemetry: one log line per interval (step, loss, lr, tok/s, MFU, ETA, memory), metrics JSONL
and PNG curves. MFU needs the device's peak dense bf16 FLOP/s, looked up by device name; where the
device is unknown (or a CPU) MFU is reported as n/a rather than guessed."""

from __future__ import annotations

import contextlib
import json
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fidellm.errors import FidelError

PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM (HBM3)
    ("H200", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("RTX 4090", 165e12),
)
"""(substring of torch.cuda.get_device_name, dense bf16 tensor-core FLOP/s from the vendor datasheet);
the first matching row wins, so more specific names come first."""


def peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of `device`, or None when it is a CPU or not in the table."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token: 6 per matmul parameter (the token lookup excluded, the output head
    included) plus attention scores and values, 12·layers·heads·head_dim·seq_len (PaLM's estimate).

    For models without that shape (the H-Net) 6 per non-embedding parameter: an upper bound there,
    since its inner stages run on one position per chunk, not per byte.
    """
    config = model.config  # type: ignore[attr-defined]
    if not hasattr(config, "num_attention_heads"):
        return 6.0 * model.num_parameters(exclude_embeddings=True)  # type: ignore[operator]
    matmul = model.num_parameters(exclude_embeddings=True) + model.lm_head.weight.numel()  # type: ignore[operator]
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq_len
    return 6.0 * matmul + attention


def memory_gib(device: torch.device) -> float:
    """Peak CUDA memory allocated on `device`, or this process's peak resident memory on CPU, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def open_tensorboard(directory: Path, resume_step: int) -> Any:
    """A TensorBoard SummaryWriter whose events past `resume_step` are superseded (purge_step)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise FidelError(
            "--tensorboard needs the tensorboard package: pip install 'fidel-lm[tensorboard]'"
        ) from error
    return SummaryWriter(str(directory), purge_step=resume_step + 1 if resume_step else None)


def format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Monitor:
    """Measures throughput between log lines and appends every record to metrics.jsonl.

    tok/s and MFU count training time only: what runs inside `paused()` (validation, checkpoints) is left
    out of the interval, so a log line after an evaluation is not slower for it. The ETA is the remaining
    steps times the run's average wall time per step so far, evaluations and checkpoints included.

    In a multi-process run every rank keeps time (the step is collective anyway) but only the one with
    `write` (rank 0) writes files; `tok/s` counts the tokens of all `n_devices` together and MFU divides
    by their summed peak. With `tensorboard` the same scalars also go to OUT/tensorboard/.
    """

    def __init__(
        self,
        out_dir: Path,
        device: torch.device,
        flops_per_tok: float,
        total_steps: int,
        resume_step: int = 0,
        echo: bool = True,
        n_devices: int = 1,
        write: bool = True,
        tensorboard: bool = False,
    ):
        self.metrics_path = out_dir / "metrics.jsonl"
        self.out_dir = out_dir
        self.device = device
        self.flops_per_tok = flops_per_tok
        peak = peak_flops(device)
        self.peak = None if peak is None else peak * n_devices
        self.total_steps = total_steps
        self.echo = echo
        self.enabled = write
        self.board = open_tensorboard(out_dir / "tensorboard", resume_step) if tensorboard and write else None
        if write:
            out_dir.mkdir(parents=True, exist_ok=True)
            self._truncate_after(resume_step)
        self._last_time = self._started = time.perf_counter()
        self._tokens = 0
        self._steps = 0
        self._steps_run = 0  # steps since this monitor started (the ETA's average)
        self._paused = 0.0  # seconds spent in `paused()` since the last log line

    def _truncate_after(self, step: int) -> None:
        """Drop records past the resumed step (written by a run that died before its next checkpoint)."""
        if not self.metrics_path.exists():
            return
        lines = [line for line in self.metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
        kept = []
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines):  # cut off by a kill mid-write: past the checkpoint anyway
                    break
                raise FidelError(
                    f"{self.metrics_path}:{number}: not JSON (damaged); remove that line to resume"
                ) from None
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise FidelError(f"{self.metrics_path}:{number}: not a metrics record (no 'step')")
            if record["step"] <= step:
                kept.append(line)
        self.metrics_path.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")

    def count(self, tokens: int) -> None:
        """Add one finished optimizer step of `tokens` tokens since the last log line."""
        self._tokens += tokens
        self._steps += 1
        self._steps_run += 1

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Leave the time inside out of tok/s and MFU (validation, checkpoint saving)."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self._paused += time.perf_counter() - began

    def write(self, record: dict[str, Any]) -> None:
        """Append `record` to metrics.jsonl (and its numbers to TensorBoard as KIND/NAME scalars)."""
        if not self.enabled:
            return
        with self.metrics_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.board is not None:
            for name, value in record.items():
                if name not in ("kind", "step", "time") and isinstance(value, (int, float)):
                    self.board.add_scalar(f"{record['kind']}/{name}", value, record["step"])

    def log_train(
        self, step: int, loss: float, lr: float, grad_norm: float, bytes_per_chunk: list[float] | None = None
    ) -> dict[str, Any]:
        """Record step `step` (1-based count of finished steps) and print its line; resets the timer.

        `bytes_per_chunk` (H-Net): the bytes each stage's chunks held in the last micro-batch.
        """
        now = time.perf_counter()
        elapsed = max(now - self._last_time - self._paused, 1e-9)
        tok_s = self._tokens / elapsed
        mfu = None if self.peak is None else tok_s * self.flops_per_tok / self.peak
        record = {
            "kind": "train",
            "step": step,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tok_per_s": tok_s,
            "mfu": mfu,
            "memory_gib": memory_gib(self.device),
            "time": time.time(),
        }
        per_step = (now - self._started) / self._steps_run if self._steps_run else None
        record["eta_s"] = None if per_step is None else (self.total_steps - step) * per_step
        if bytes_per_chunk:
            record["bytes_per_chunk"] = bytes_per_chunk
        self._last_time, self._tokens, self._steps, self._paused = now, 0, 0, 0.0
        self.write(record)
        if self.echo:
            eta = "n/a" if record["eta_s"] is None else format_seconds(record["eta_s"])
            mfu_text = "n/a" if mfu is None else f"{100 * mfu:.1f}%"
            chunks = "/".join(f"{b:.2f}" for b in bytes_per_chunk or [])
            chunk_text = f" | bytes/chunk {chunks}" if chunks else ""
            print(
                f"step {step}/{self.total_steps} | loss {loss:.4f} | lr {lr:.2e} | {tok_s:,.0f} tok/s"
                f" | MFU {mfu_text} | ETA {eta} | mem {record['memory_gib']:.2f} GiB{chunk_text}",
                flush=True,
            )
        return record

    def log_val(
        self,
        step: int,
        loss: float,
        bpb: float,
        by_source: dict[str, float] | None = None,
        selected: float | None = None,
        trained: tuple[float, float] | None = None,
    ) -> None:
        """Record a validation result (with the bits/byte of each source, of the sources the best weights
        are chosen by, and, when `loss` is a weight average's, the trained weights' loss and bits/byte)
        and print it."""
        record = {"kind": "val", "step": step, "val_loss": loss, "val_bpb": bpb, "time": time.time()}
        if by_source:
            record["val_bpb_by_source"] = by_source
        if selected is not None:
            record["val_bpb_selected"] = selected
        if trained is not None:
            record["val_loss_trained"], record["val_bpb_trained"] = trained
        self.write(record)
        if self.echo:
            chosen = f" | selected sources {selected:.4f}" if selected is not None else ""
            own = f" | trained weights {trained[0]:.4f}, {trained[1]:.4f}" if trained is not None else ""
            kind = "averaged " if trained is not None else ""
            line = f"step {step} | {kind}val loss {loss:.4f} | val bits/byte {bpb:.4f}{chosen}{own}"
            print(line, flush=True)

    def close(self) -> Path | None:
        """Flush TensorBoard and draw curves.png; returns the plot's path (None when nothing was logged)."""
        if self.board is not None:
            self.board.close()
        return self.plot() if self.enabled else None

    def plot(self) -> Path | None:
        """Loss (train, val), lr, tok/s and val bits/byte by source against step in curves.png; None when
        nothing was logged."""
        if not self.metrics_path.exists():
            return None
        records = [json.loads(line) for line in self.metrics_path.read_text(encoding="utf-8").splitlines()]
        train = [r for r in records if r["kind"] == "train"]
        val = [r for r in records if r["kind"] == "val"]
        if not train:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        by_source = [r for r in val if r.get("val_bpb_by_source")]
        fig, axes = plt.subplots(1, 4 if by_source else 3, figsize=(20 if by_source else 15, 4))
        steps = [r["step"] for r in train]
        axes[0].plot(steps, [r["loss"] for r in train], label="train")
        if val:
            averaged = any("val_loss_trained" in r for r in val)
            label = "val (weight average)" if averaged else "val"
            axes[0].plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label=label)
        if val and averaged:
            trained = [(r["step"], r["val_loss_trained"]) for r in val if "val_loss_trained" in r]
            axes[0].plot(*zip(*trained, strict=True), "x--", label="val (trained weights)")
        axes[0].set(xlabel="step", ylabel="loss (nats/token)", title="loss")
        axes[0].legend()
        axes[1].plot(steps, [r["lr"] for r in train])
        axes[1].set(xlabel="step", ylabel="learning rate", title="learning rate")
        axes[2].plot(steps, [r["tok_per_s"] for r in train])
        axes[2].set(xlabel="step", ylabel="tokens/s", title="throughput")
        if by_source:
            for name in dict.fromkeys(n for r in by_source for n in r["val_bpb_by_source"]):
                points = [
                    (r["step"], r["val_bpb_by_source"][name])
                    for r in by_source
                    if name in r["val_bpb_by_source"]
                ]
                axes[3].plot(*zip(*points, strict=True), "o-", markersize=3, label=name)
            axes[3].set(xlabel="step", ylabel="bits/byte", title="validation by source")
            axes[3].legend(fontsize=6)
        fig.tight_layout()
        path = self.out_dir / "curves.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path
