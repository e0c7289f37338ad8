"""The GPU-session scripts run on the lent device's image, which lacks some of our dependencies.

The device machine cannot install packages (no network) and its Python image has torch, tokenizers,
safetensors, matplotlib, rich … but not the data-stage and serving packages below (the device tool's
KINDS.md, package list read 2026-11-17). `benchmarks/gpu_session.sh` carries token shards, not raw data,
so training, tokenizing splits and FLORES scoring must not import them. A meta-path finder that refuses
these names stands in for that image in a fresh interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fixtures.train.build_run import build_flores_run

ROOT = Path(__file__).resolve().parents[1]
NOT_ON_DEVICE = (
    "datatrove", "zstandard", "pycld2", "orjson", "gguf", "seqeval", "fastapi", "starlette", "pydantic",
    "uvicorn", "httptools", "sse_starlette", "redis", "lm_eval", "bitsandbytes", "httpx2", "mwparserfromhell",
)  # fmt: skip

SCRIPT = textwrap.dedent(
    """
    import importlib.abc, shutil, sys
    from pathlib import Path

    class DeviceImage(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {missing!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}} (not on the device image)")

    sys.meta_path.insert(0, DeviceImage())
    import bench_muon, bench_train, cuda_checks, ema_decays, minimal_gpt  # noqa: F401
    import quality_run, source_contribution  # noqa: F401
    from fidellm.eval.lm import score_lines
    from fidellm.models.load import load_checkpoint_model
    from fidellm.paths import resolve_data_dir
    from fidellm.tokenizer.base import load_tokenizer
    from fidellm.tokenizer.report import flores_lines
    from fidellm.tokenizer.shards import tokenize_splits
    from fidellm.train.config import TrainConfig
    from fidellm.train.loop import train

    run = Path(sys.argv[1])
    shutil.rmtree(run / "tokens")
    tokenize_splits(run, workers=1, show_progress=False)  # as source_contribution.py re-tokenizes
    small = dict(num_hidden_layers=1, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=32)
    train(run, TrainConfig(model_overrides=small, seq_len=64, batch_size=2, max_steps=2, warmup_steps=1,
                           eval_every=2, eval_batches=1, log_every=1, echo=False))
    model = load_checkpoint_model(run / "train" / "best", "cpu")
    lines = flores_lines(resolve_data_dir())[:8]
    scores = score_lines(model, load_tokenizer(run / "tokenizer"), lines, "cpu")
    print("scored", scores.lines, "lines:", round(scores.second_half_bits, 2), "bits")
    """
).format(missing=set(NOT_ON_DEVICE))


@pytest.mark.slow
def test_training_and_flores_scoring_need_nothing_the_device_image_lacks(tmp_path: Path) -> None:
    run = build_flores_run(tmp_path / "run")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "benchmarks")])}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(run)], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "scored 8 lines" in done.stdout


def test_the_device_image_stand_in_refuses_what_it_lists() -> None:
    """The check above can fail: the stand-in makes importing a listed package an error."""
    script = SCRIPT.split("import bench_muon")[0] + "import datatrove\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "not on the device image" in done.stderr
