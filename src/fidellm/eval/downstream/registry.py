"""Downstream tasks by name, for `fidellm eval --tasks` (each: EvalContext -> list of TaskResult).

- sib200: SIB-200 amh topic by label likelihood, 0-shot and 5-shot (seeded demonstrations).
- afrisenti, masakhanews, masakhaner: a head on frozen features (linear probe); AfriSenti also by
  0-shot label likelihood. The `-finetune` variants fine-tune backbone and head (slower).
- lmeval: the SIB-200 and AfriSenti tasks through lm-evaluation-harness on a float32 HF export of the
  model (needs `pip install 'fidel-lm[eval]'`); its numbers must equal ours (tests check they do).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from fidellm.errors import FidelError
from fidellm.eval.results import TaskResult

if TYPE_CHECKING:
    from fidellm.eval.suite import EvalContext


def _sib200(ctx: EvalContext) -> list[TaskResult]:
    from fidellm.eval.downstream.sib import evaluate_sib

    return [
        evaluate_sib(ctx.model, ctx.tokenizer, ctx.data_dir, shots=shots, seed=ctx.seed, limit=ctx.limit)
        for shots in (0, 5)
    ]


def _head(task: str, mode: str) -> Callable[[EvalContext], list[TaskResult]]:
    def run(ctx: EvalContext) -> list[TaskResult]:
        from fidellm.eval.downstream import finetuned
        from fidellm.eval.downstream.heads import HeadSettings

        evaluate = getattr(finetuned, f"evaluate_{task}")
        settings = HeadSettings(seed=ctx.seed)
        model, tokenizer, data_dir, limit = ctx.model, ctx.tokenizer, ctx.data_dir, ctx.limit
        result = evaluate(model, tokenizer, data_dir, mode=mode, limit=limit, settings=settings)
        if mode == "finetune":  # named as asked: beside the probe's figure, not in place of it
            result.task = f"{result.task}-finetune"
        results = [result]
        if task == "afrisenti" and mode == "probe":
            from fidellm.eval.downstream.sib import evaluate_afrisenti_likelihood

            results.append(evaluate_afrisenti_likelihood(model, tokenizer, data_dir, limit=limit))
        return results

    return run


LMEVAL_METRICS = {"acc": "acc", "acc_norm": "acc_norm", "f1": "macro_f1"}
"""lm-eval's metric (as the task YAMLs name it; AfriSenti's macro-F1 is "f1") -> our metric name."""


def _lmeval(ctx: EvalContext) -> list[TaskResult]:
    from fidellm.eval.downstream.lmeval import run_lm_eval, write_lmeval_tasks
    from fidellm.eval.downstream.sib import TASK_NAMES
    from fidellm.export.hf import export_hf
    from fidellm.models.llama import LlamaForCausalLM

    if not isinstance(ctx.model, LlamaForCausalLM) or ctx.tokenizer_dir is None:  # an H-Net has lm_head too
        name = type(ctx.model).__name__
        raise FidelError(
            f"lmeval needs a Llama model and its tokenizer directory (it runs on an HF export); got {name}"
        )
    with tempfile.TemporaryDirectory() as scratch:
        scratch_dir = Path(scratch)
        model, config = ctx.model, ctx.model.config
        hf_dir = export_hf(model, config, ctx.tokenizer_dir, scratch_dir / "hf", dtype="float32")
        tasks_dir = write_lmeval_tasks(ctx.data_dir, scratch_dir / "tasks")
        device = str(ctx.device)
        found = run_lm_eval(hf_dir, tasks_dir, TASK_NAMES, limit=ctx.limit, seed=ctx.seed, device=device)
    results = []
    for name, scores in found["results"].items():
        for metric, ours in LMEVAL_METRICS.items():
            if f"{metric},none" in scores:
                n = found.get("n-samples", {}).get(name, {}).get("effective", 0)
                results.append(TaskResult(f"lmeval/{name}", ours, float(scores[f"{metric},none"]), n))
    return results


DOWNSTREAM_TASKS: dict[str, Callable[[EvalContext], list[TaskResult]]] = {
    "sib200": _sib200,
    "afrisenti": _head("afrisenti", "probe"),
    "masakhanews": _head("masakhanews", "probe"),
    "masakhaner": _head("masakhaner", "probe"),
    "afrisenti-finetune": _head("afrisenti", "finetune"),
    "masakhanews-finetune": _head("masakhanews", "finetune"),
    "masakhaner-finetune": _head("masakhaner", "finetune"),
    "lmeval": _lmeval,
}
