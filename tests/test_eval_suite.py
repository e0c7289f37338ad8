"""The evaluation suite: baselines, probe measurements, the transformers cross-check, results.json and
the report card, end to end on a tiny trained run."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import transformers
from click.testing import CliRunner

from fidellm.cli import cli
from fidellm.errors import FidelError
from fidellm.eval.baselines import PUBLISHED_ANCHORS, compressed_bits_per_char
from fidellm.eval.lm import score_lines
from fidellm.eval.probes import (
    continuation_bits_per_char,
    distinct_n,
    ethiopic_share,
    heldout_line,
    repetition_rate,
    run_probes,
)
from fidellm.eval.report import build_report
from fidellm.export.hf import export_hf, load_hf_dir
from fidellm.paths import resolve_data_dir
from fidellm.tokenizer.base import load_tokenizer
from fidellm.tokenizer.bpe import train_bpe
from fidellm.tokenizer.bytes import ByteTokenizer
from fidellm.tokenizer.report import flores_lines
from fidellm.train.config import TrainConfig
from fidellm.train.loop import train
from fixtures.models import gqa_config, random_llama
from fixtures.train.build_run import build_flores_run
from test_eval_lm import Uniform

TINY = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 32}  # fmt: skip


def test_compressors_price_text_they_have_seen_as_nearly_free():
    text = "ኢትዮጵያ በምሥራቅ አፍሪካ የምትገኝ አገር ናት። " * 20
    alone = compressed_bits_per_char(text)
    primed = compressed_bits_per_char(text, context=text)
    for name in ("bz2", "xz", "zstd", "gzip"):
        assert 0 <= primed[name] < alone[name] / 3, name
    assert compressed_bits_per_char("ab", names=("gzip",))["gzip"] > 8  # headers cost more than the text


def test_published_anchors_are_the_design_notes_numbers():
    values = {a.model: a.value for a in PUBLISHED_ANCHORS}
    assert values["bigram"] == 111.87 and values["Goldfish-10MB"] == 121.29
    notes = Path(__file__).resolve().parents[2] / "shared" / "design" / "evaluation.md"
    if notes.is_file():
        text = notes.read_text(encoding="utf-8")
        for anchor in PUBLISHED_ANCHORS:
            if anchor.model != "XGLM-4.5B":  # from issue 3, not the design notes
                assert re.search(rf"{re.escape(anchor.model)} {anchor.value:.2f}", text), anchor


def test_probe_measurements_on_hand_checkable_texts():
    assert ethiopic_share(["ሀ a", "  "]) == 0.5 and ethiopic_share([""]) == 0.0
    assert distinct_n(["a b a b"], 1) == 0.5 and distinct_n(["a b a b"], 2) == 2 / 3
    assert repetition_rate(["a b c a b c"]) == 0.25 and repetition_rate(["a b"]) == 0.0
    assert heldout_line("ቡና", ["ሻይ ብቻ", "ቡና", "እኔ ቡና እወዳለሁ።"]) == ("እኔ ቡና", " እወዳለሁ።")
    assert heldout_line("ቡና", ["ሻይ"]) is None
    bpc = continuation_bits_per_char(Uniform(256), ByteTokenizer(), "እኔ ቡና", " እወዳለሁ።", "cpu")
    assert bpc == pytest.approx(8.0 * len(" እወዳለሁ።".encode()) / len(" እወዳለሁ።"))


def test_probes_are_seeded_not_picked():
    config = gqa_config(vocab_size=256, max_position_embeddings=128)
    model = random_llama(config, random_norms=False)
    first = run_probes(model, ByteTokenizer(), ["ቡና ጣፋጭ ነው።"], "cpu", samples=2, max_new_tokens=8)
    again = run_probes(model, ByteTokenizer(), ["ቡና ጣፋጭ ነው።"], "cpu", samples=2, max_new_tokens=8)
    assert [p.samples for p in first] == [p.samples for p in again]
    assert len(first) == 5 and all(len(p.samples) == 2 and p.seeds == [0, 1] for p in first)
    assert first[3].heldout_line == "ቡና ጣፋጭ ነው።" and first[3].heldout_bits_per_char > 0
    assert first[0].heldout_bits_per_char is None  # no held-out line holds ይፈልጋሉ


def test_flores_bits_equal_an_independent_transformers_computation(tmp_path: Path):
    lines = flores_lines(resolve_data_dir())
    tokenizer_dir = tmp_path / "tokenizer"
    train_bpe(lines[:997], 640, show_progress=False).save(tokenizer_dir)
    model = random_llama(gqa_config(vocab_size=640, max_position_embeddings=256), random_norms=False)
    export_hf(model, model.config, tokenizer_dir, tmp_path / "hf", dtype="float32")
    sample = lines[::40]  # 51 lines of dev and devtest
    ours = score_lines(load_hf_dir(tmp_path / "hf")[0], load_tokenizer(tmp_path / "hf"), sample, "cpu")

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    second_halves = []
    for line in sample:
        ids = hf_tokenizer(line, return_tensors="pt").input_ids  # BOS + line
        cut = len(hf_tokenizer(line[: len(line) // 2], add_special_tokens=False).input_ids)
        with torch.no_grad():
            logprobs = torch.log_softmax(hf(ids).logits[0, :-1].double(), dim=-1)
        bits = -logprobs.gather(1, ids[0, 1:, None])[:, 0] / math.log(2)
        second_halves.append(bits[cut:].sum().item())
    assert ours.second_half_bits == pytest.approx(sum(second_halves) / len(sample), rel=1e-5)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = build_flores_run(tmp_path_factory.mktemp("eval"))
    config = TrainConfig(model_overrides=TINY, seq_len=64, batch_size=4, max_steps=4, warmup_steps=1,
                         eval_every=2, eval_batches=2, save_every=0, echo=False)  # fmt: skip
    train(run, config)
    return run


@pytest.mark.slow
def test_eval_then_report_card_end_to_end(trained_run: Path, tmp_path: Path):
    tasks = "flores,heldout,baselines,probes"
    result = CliRunner().invoke(
        cli, ["eval", str(trained_run), "--tasks", tasks, "--limit", "20", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((trained_run / "eval/results.json").read_text())
    found = {(r["task"], r["metric"]) for r in report["results"]}
    expected = [("flores", "second_half_bits"), ("heldout", "bits_per_byte"), ("probes", "ethiopic_share"),
                ("flores/xz+train", "bits_per_char")]  # fmt: skip
    assert set(expected) <= found
    heldout = {r["task"]: r for r in report["results"] if r["task"].startswith("heldout")}
    per_source = [r for task, r in heldout.items() if task != "heldout"]
    assert per_source and sum(r["n"] for r in per_source) == heldout["heldout"]["n"]
    flores = next(r for r in report["results"] if r["metric"] == "second_half_bits")
    assert flores["n"] == 2009 and 0 < flores["value"] < 400 and not flores["higher_is_better"]
    assert any(path.endswith("amh_Ethi.devtest") for path in report["data_files"])
    assert report["provenance"]["commit"] is not None and report["tokenizer"]["flores"]["tokens_per_word"] > 1

    second = tmp_path / "copy"
    second.mkdir()
    (second / "results.json").write_text(json.dumps({**report, "run": None}))
    card = build_report([trained_run, second / "results.json"], tmp_path / "card")
    text = card.read_text()
    assert "| flores | second_half_bits | lower |" in text and "Goldfish-100MB | 95.19" in text
    assert text.count("ran with `--limit 20`: held-out, downstream and chat figures") == 2
    assert (tmp_path / "card/curves.png").is_file() and (tmp_path / "card/compute.png").is_file()
    record = json.loads((tmp_path / "card/report.json").read_text())
    assert len(record["runs"]) == 2 and len(record["runs"][0]["sha256"]) == 64

    bad = CliRunner().invoke(cli, ["eval", str(trained_run), "--tasks", "flores,nosuch", "--device", "cpu"])
    assert isinstance(bad.exception, FidelError) and "nosuch" in str(bad.exception)
    with pytest.raises(FidelError, match=r"no results\.json"):
        build_report([tmp_path], tmp_path / "none")


def test_held_out_eval_needs_no_flores_files(trained_run: Path, tmp_path: Path):
    empty = tmp_path / "data"
    empty.mkdir()  # a data directory without flores200/
    out = tmp_path / "eval"
    args = ["eval", str(trained_run), "--data-dir", str(empty), "--tasks", "heldout", "--limit", "5"]
    result = CliRunner().invoke(cli, [*args, "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "results.json").read_text())
    assert report["tokenizer"]["flores"] is None and report["results"][0]["task"].startswith("heldout")
    card = build_report([out / "results.json"], tmp_path / "card").read_text()
    assert "| n/a | n/a |" in card
    flores = CliRunner().invoke(cli, [*args[:-4], "--tasks", "flores", "--device", "cpu", "--out", str(out)])
    assert isinstance(flores.exception, FidelError) and "amh_Ethi.dev" in str(flores.exception)


def test_heldout_documents_are_encoded_as_the_token_shards_encode_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A control token's string in a held-out document is text, as in training (load_document_tokenizer),
    while the context's own tokenizer (chat rendering, probes) keeps its control tokens."""
    from fidellm.eval import suite
    from fidellm.tokenizer.special import BOS_ID, IM_END_ID

    lines = (resolve_data_dir() / "flores200" / "amh_Ethi.dev").read_text(encoding="utf-8").splitlines()
    train_bpe(lines, 512, show_progress=False).save(tmp_path / "tokenizer")
    text = "ሰላም <|bos|> ዓለም <|im_end|>"
    tokenizer = load_tokenizer(tmp_path / "tokenizer")
    ctx = suite.EvalContext(
        torch.nn.Linear(1, 1),
        tokenizer,
        torch.device("cpu"),
        tmp_path,
        tmp_path,
        tokenizer_dir=tmp_path / "tokenizer",
    )
    assert {BOS_ID, IM_END_ID} <= set(ctx.tokenizer.encode(text))
    scored: list[list[int]] = []

    def score_documents(model, tokenizer, texts, device, sources):
        scored.extend(tokenizer.encode_batch(texts))
        raise StopIteration

    document = type("Document", (), {"text": text, "source": "s"})
    monkeypatch.setattr(ctx, "split_documents", lambda split: [document])
    monkeypatch.setattr(suite, "score_documents", score_documents)
    with pytest.raises(StopIteration):
        suite.task_heldout(ctx)
    assert scored and not {BOS_ID, IM_END_ID} & set(scored[0])
    assert ctx.tokenizer.decode(scored[0]) == text
