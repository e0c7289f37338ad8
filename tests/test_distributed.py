"""Multi-process training: `torchrun -m fidellm train` with 2 CPU processes (gloo) equals one process.

Two processes with --batch-size 4 see exactly the windows one process with --batch-size 8 sees (see
PackedBatches), and DDP averages their gradients, so losses and weights must agree up to float
summation order. FSDP2 (parameters sharded per block) must agree too, and a 2-process run must
resume from its own checkpoint (and a 1-process run from a 2-process checkpoint). Every run keeps a
weight average (`--ema-decay`), so the averaged weights and their validation are compared as well as
the trained ones. DDP and FSDP2 also train with Muon (`--optimizer muon`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fidellm.compat import FSDP_ON_CPU, torch_release
from fidellm.train.config import TrainConfig
from fidellm.train.distributed import Distributed, _by_index, _by_name
from fidellm.train.loop import train

STEPS = 6
COMMON = ["--preset", "tiny", "--seq-len", "64", "--grad-accum", "2", "--steps", str(STEPS), "--warmup", "2",
          "--lr", "3e-3", "--eval-every", "3", "--log-every", "1", "--save-every", "3",
          "--ema-decay", "0.9"]  # fmt: skip
LOSS_RTOL = 1e-4
WEIGHT_ATOL = 1e-4


def copy_run(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, ignore=lambda d, names: ["train"] if Path(d) == source else [])
    return target


def torchrun(run: Path, *options: str, processes: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N -m fidellm train RUN ...` on CPU, checked."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               "-m", "fidellm", "train", str(run), *COMMON, "--device", "cpu", *options]  # fmt: skip
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        # torchrun starts each worker in a session of its own (killing the launcher's group misses them, and
        # they hold the output pipes open): SIGTERM makes it stop them, then what they wrote can be read.
        process.terminate()
        try:
            stdout, stderr = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = "", "(torchrun did not stop its workers within 60 s of SIGTERM; output lost)"
        pytest.fail(f"torchrun timed out:\n{stdout[-3000:]}{stderr[-3000:]}")
    assert process.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def logged(run: Path, kind: str, field: str) -> list[float]:
    lines = (run / "train/metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r[field] for r in map(json.loads, lines) if r["kind"] == kind]


def final_weights(run: Path, file: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(run / f"train/checkpoints/step_{STEPS:08d}/{file}"))


@pytest.fixture(scope="module")
def single(flores_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: one process, batch 8 (= 2 processes × 4)."""
    run = copy_run(flores_run, tmp_path_factory.mktemp("single") / "run")
    config = TrainConfig(
        preset="tiny", seq_len=64, batch_size=8, grad_accum=2, max_steps=STEPS, warmup_steps=2, lr=3e-3,
        eval_every=3, log_every=1, save_every=3, device="cpu", echo=False, ema_decay=0.9,
    )  # fmt: skip
    train(run, config)
    return run


def assert_same_training(run: Path, reference: Path) -> None:
    fields = [("train", "loss")] + [("val", f"val_{x}{y}") for x in ("loss", "bpb") for y in ("", "_trained")]
    for kind, field in fields:
        ours, theirs = logged(run, kind, field), logged(reference, kind, field)
        torch.testing.assert_close(ours, theirs, rtol=LOSS_RTOL, atol=0, msg=field)
    for file in ("model.safetensors", "average.safetensors"):
        ours, theirs = final_weights(run, file), final_weights(reference, file)
        assert ours.keys() == theirs.keys()
        for name in ours:
            torch.testing.assert_close(
                ours[name], theirs[name], atol=WEIGHT_ATOL, rtol=0, msg=f"{file} {name}"
            )


@pytest.mark.slow
def test_ddp_two_processes_equal_one_and_resume(flores_run: Path, single: Path, tmp_path: Path) -> None:
    run = copy_run(flores_run, tmp_path / "ddp")
    first = torchrun(run, "--batch-size", "4", "--stop-at-step", "3")
    assert first.stdout.count("step 1/6 |") == 1 and first.stdout.count("step 3: ") == 1  # rank 0 prints
    state = json.loads((run / "train/checkpoints/step_00000003/state.json").read_text())
    assert state["world_size"] == 2
    assert len(torch.load(run / "train/checkpoints/step_00000003/rng.pt")["ranks"]) == 2
    torchrun(run, "--batch-size", "4")  # resumes at step 3 with both processes
    assert json.loads((run / "train/config.json").read_text())["world_size"] == 2
    assert_same_training(run, single)
    assert logged(run, "train", "tok_per_s")[0] > 0


@pytest.fixture(scope="module")
def single_muon(flores_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference of the Muon runs: one process, batch 8."""
    run = copy_run(flores_run, tmp_path_factory.mktemp("single_muon") / "run")
    config = TrainConfig(
        preset="tiny", seq_len=64, batch_size=8, grad_accum=2, max_steps=STEPS, warmup_steps=2, lr=3e-3,
        eval_every=3, log_every=1, save_every=3, device="cpu", echo=False, ema_decay=0.9, optimizer="muon",
    )  # fmt: skip
    train(run, config)
    return run


@pytest.mark.slow
def test_ddp_with_muon_equals_one_process(flores_run: Path, single_muon: Path, tmp_path: Path) -> None:
    run = copy_run(flores_run, tmp_path / "ddp")
    torchrun(run, "--batch-size", "4", "--optimizer", "muon")
    assert_same_training(run, single_muon)


needs_cpu_fsdp = pytest.mark.skipif(
    torch_release() < FSDP_ON_CPU, reason=f"FSDP2 on CPU needs torch >= 2.9, this is {torch.__version__}"
)


@pytest.mark.slow
@needs_cpu_fsdp
def test_fsdp_two_processes_equal_one(flores_run: Path, single: Path, tmp_path: Path) -> None:
    run = copy_run(flores_run, tmp_path / "fsdp")
    torchrun(run, "--batch-size", "4", "--strategy", "fsdp")
    assert_same_training(run, single)


@pytest.mark.slow
@needs_cpu_fsdp
def test_one_process_resumes_a_two_process_checkpoint(flores_run: Path, single: Path, tmp_path: Path) -> None:
    run = copy_run(flores_run, tmp_path / "mixed")
    torchrun(run, "--batch-size", "4", "--strategy", "fsdp", "--stop-at-step", "3")
    config = TrainConfig(
        preset="tiny", seq_len=64, batch_size=8, grad_accum=2, max_steps=STEPS, warmup_steps=2, lr=3e-3,
        eval_every=3, log_every=1, save_every=3, device="cpu", echo=False, ema_decay=0.9,
    )  # fmt: skip
    assert train(run, config)["resumed_from"] == 3
    assert_same_training(run, single)


@pytest.mark.slow
@needs_cpu_fsdp
def test_fsdp_with_muon_equals_one_process_and_resumes(
    flores_run: Path, single_muon: Path, tmp_path: Path
) -> None:
    """Muon on FSDP2 shards: each matrix's Newton-Schulz runs on one process, which sends the others their
    rows (fidellm.train.muon_shards); the chained optimizer's sharded state is saved whole and sharded
    again on resume."""
    run = copy_run(flores_run, tmp_path / "fsdp")
    torchrun(run, "--batch-size", "4", "--strategy", "fsdp", "--optimizer", "muon", "--stop-at-step", "3")
    saved, alone = (
        torch.load(r / "train/checkpoints/step_00000003/optimizer.pt", weights_only=True)["optimizer"]
        for r in (run, single_muon)
    )
    shapes = [
        [{k: tuple(v.shape) for k, v in entry.items()} for _, entry in sorted(member["state"].items())]
        for member in saved["optimizers"]
    ]
    assert len(shapes) == 2 and shapes == [  # Muon's state and AdamW's, whole, as one process saves them
        [{k: tuple(v.shape) for k, v in entry.items()} for _, entry in sorted(member["state"].items())]
        for member in alone["optimizers"]
    ]
    torchrun(run, "--batch-size", "4", "--strategy", "fsdp", "--optimizer", "muon")
    assert_same_training(run, single_muon)


def test_optimizer_state_renaming_round_trips() -> None:
    names = ["b", "a", "c"]  # the optimizer's order, not alphabetical
    plain = {
        "state": {0: {"step": 1}, 2: {"step": 3}},
        "param_groups": [{"params": [0, 1], "lr": 0.1}, {"params": [2], "lr": 0.2}],
    }
    named = _by_name(names, plain)
    assert named["state"] == {"b": {"step": 1}, "c": {"step": 3}}
    assert named["param_groups"][0]["params"] == ["b", "a"]
    assert _by_index(names, named) == plain


def test_single_process_context_is_a_no_op() -> None:
    ctx = Distributed()
    value = torch.tensor([1.0, 2.0])
    assert not ctx.enabled and ctx.main
    assert ctx.mean(value) is value and ctx.gather("x") == ["x"] and ctx.broadcast(3) == 3
