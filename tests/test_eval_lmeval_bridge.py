"""Tasks of `fidellm eval` bridged to other code: lm-eval's metrics kept, fine-tuned heads named apart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from fidellm.errors import FidelError
from fidellm.eval.downstream import lmeval
from fidellm.eval.downstream.registry import DOWNSTREAM_TASKS
from fidellm.eval.results import TaskResult
from fidellm.eval.suite import EvalContext
from fidellm.export import hf
from fidellm.tokenizer.bytes import ByteTokenizer
from fixtures.models import gqa_config, random_llama


def test_lmeval_keeps_afrisenti_macro_f1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    found: dict[str, Any] = {
        "results": {
            "fidel_sib200_amh": {"alias": "x", "acc,none": 0.5, "acc_norm,none": 0.25},
            "fidel_afrisenti_amh": {"acc,none": 0.6, "acc_norm,none": 0.4, "f1,none": 0.3},
        },
        "n-samples": {"fidel_sib200_amh": {"effective": 4}, "fidel_afrisenti_amh": {"effective": 5}},
    }
    monkeypatch.setattr(hf, "export_hf", lambda model, config, tokenizer_dir, out, dtype: out)
    monkeypatch.setattr(lmeval, "write_lmeval_tasks", lambda data_dir, out: out)
    monkeypatch.setattr(lmeval, "run_lm_eval", lambda *args, **kwargs: found)
    model = random_llama(gqa_config(vocab_size=256, num_hidden_layers=1))
    ctx = EvalContext(model, ByteTokenizer(), torch.device("cpu"), tmp_path, None, tokenizer_dir=tmp_path)
    results = {(r.task, r.metric): (r.value, r.n) for r in DOWNSTREAM_TASKS["lmeval"](ctx)}
    assert results == {
        ("lmeval/fidel_sib200_amh", "acc"): (0.5, 4),
        ("lmeval/fidel_sib200_amh", "acc_norm"): (0.25, 4),
        ("lmeval/fidel_afrisenti_amh", "acc"): (0.6, 5),
        ("lmeval/fidel_afrisenti_amh", "acc_norm"): (0.4, 5),
        ("lmeval/fidel_afrisenti_amh", "macro_f1"): (0.3, 5),  # lm-eval's "f1" was dropped
    }


def test_lmeval_names_a_model_it_cannot_export(tmp_path: Path) -> None:
    model = torch.nn.Module()
    model.lm_head = torch.nn.Linear(1, 1)  # as an H-Net has: not a Llama all the same
    ctx = EvalContext(model, ByteTokenizer(), torch.device("cpu"), tmp_path, None, tokenizer_dir=tmp_path)
    with pytest.raises(FidelError, match=r"lmeval needs a Llama model .*; got Module"):
        DOWNSTREAM_TASKS["lmeval"](ctx)


def test_a_fine_tuned_head_is_reported_under_its_own_task_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fidellm.eval.downstream import finetuned

    def evaluate(model, tokenizer, data_dir, mode, limit, settings) -> TaskResult:
        return TaskResult(
            "masakhanews", "macro_f1", 0.5 if mode == "probe" else 0.7, 3, details={"mode": mode}
        )

    monkeypatch.setattr(finetuned, "evaluate_masakhanews", evaluate)
    ctx = EvalContext(torch.nn.Linear(1, 1), ByteTokenizer(), torch.device("cpu"), tmp_path, None)
    found = [
        (r.task, r.value)
        for name in ("masakhanews", "masakhanews-finetune")
        for r in DOWNSTREAM_TASKS[name](ctx)
    ]
    # both were "masakhanews": the report card and report.json kept the last one only
    assert found == [("masakhanews", 0.5), ("masakhanews-finetune", 0.7)]
