"""Chat SFT: assistant-only masks, packing, resumable order, full and LoRA runs through train(), merging
and the `fidellm sft` command (a small BPE trained on FLORES dev and a tiny random Llama)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from fidellm.chat.template import encode_chat, render_chat
from fidellm.cli import cli
from fidellm.errors import FidelError
from fidellm.export.hf import export_hf
from fidellm.models.factory import build_model, config_from_dict, config_to_dict
from fidellm.models.hnet import HNetForCausalLM
from fidellm.models.hnet import preset as hnet_preset
from fidellm.models.load import load_model
from fidellm.models.loss import IGNORE_INDEX
from fidellm.paths import resolve_data_dir
from fidellm.sft.cli import prepare_output
from fidellm.sft.data import (
    ConversationBatches,
    Example,
    encode_conversation,
    pack,
    tokenize_conversations,
)
from fidellm.sft.lora import apply_lora, lora_spec, merge_lora, merge_run
from fidellm.tokenizer.base import load_tokenizer
from fidellm.tokenizer.bpe import BPETokenizer, train_bpe
from fidellm.tokenizer.bytes import ByteTokenizer
from fidellm.tokenizer.special import BOS, BOS_ID, BYTE_BOS_ID, IM_END, IM_END_ID, IM_START, PAD_ID
from fidellm.train.checkpoint import latest_checkpoint, read_checkpoint, restore_checkpoint, save_checkpoint
from fidellm.train.config import TrainConfig
from fidellm.train.loop import train
from fixtures.chats import WEATHER_TOOL, tool_chat
from fixtures.models import gqa_config, random_llama

VOCAB = 768
SEQ = 128


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    lines = (resolve_data_dir() / "flores200" / "amh_Ethi.dev").read_text(encoding="utf-8").splitlines()
    directory = tmp_path_factory.mktemp("tokenizer")
    train_bpe(lines, VOCAB, show_progress=False).save(directory)
    return directory


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path) -> BPETokenizer:
    return BPETokenizer.load(tokenizer_dir)


def conversations(count: int) -> list[dict[str, Any]]:
    """`count` short conversations: plain two-turn chats and tool chats (arguments as JSON strings)."""
    lines = (resolve_data_dir() / "flores200" / "amh_Ethi.dev").read_text(encoding="utf-8").splitlines()
    chats = []
    for i in range(count):
        if i % 3 == 2:
            messages = tool_chat(json.dumps({"city": "ባህር ዳር", "days": i}, ensure_ascii=False))
            chats.append({"id": f"c{i}", "source": "t", "messages": messages, "tools": [WEATHER_TOOL]})
            continue
        messages = [
            {"role": "system", "content": "አጭር መልስ ስጥ።"},
            {"role": "user", "content": lines[i][:40]},
            {"role": "assistant", "content": lines[i + 100][:30]},
            {"role": "user", "content": "ሌላስ?"},
            {"role": "assistant", "content": lines[i + 200][:20]},
        ]
        chats.append({"id": f"c{i}", "source": "p", "messages": messages})
    return chats


def spans(mask: list[int]) -> list[tuple[int, int]]:
    """[start, end) runs of 1s."""
    found, start = [], None
    for i, bit in enumerate([*mask, 0]):
        if bit and start is None:
            start = i
        elif not bit and start is not None:
            found.append((start, i))
            start = None
    return found


@pytest.mark.parametrize("index", [0, 2])
def test_mask_is_exactly_the_assistant_turns(tokenizer: BPETokenizer, index: int) -> None:
    chat = conversations(3)[index]
    ids, mask = encode_conversation(tokenizer, chat["messages"], chat.get("tools"), chat["id"])
    assert ids == tokenizer.encode(render_chat(chat["messages"], chat.get("tools"))) and ids[0] == BOS_ID
    header = f"{IM_START}assistant\n"
    text = render_chat(chat["messages"], chat.get("tools"))
    expected = [part.split(IM_END)[0] + IM_END for part in text.split(header)[1:]]  # content .. <|im_end|>
    runs = spans(mask)
    assert [tokenizer.decode(ids[a:b]) for a, b in runs] == expected
    for a, b in runs:
        assert tokenizer.decode(ids[:a]).endswith(header)  # the header itself is not trained on
        assert ids[b - 1] == IM_END_ID and mask[b - 1] == 1 and tokenizer.decode([ids[b]]) == "\n"
    if index == 2:  # the tool-call turn: the <tool_call> JSON is trained on, the tool results are not
        assert expected[0].startswith('<tool_call>{"name": "get_weather", "arguments": {"city": "ባህር ዳር"')
        assert "<tool_response>" not in "".join(tokenizer.decode(ids[a:b]) for a, b in runs)
    assert sum(mask) == sum(b - a for a, b in runs) < len(ids)


def test_prefix_instability_names_the_conversation(tokenizer: BPETokenizer) -> None:
    class Merging(BPETokenizer):
        """Encodes a trailing "assistant\\n" as another id, as a BPE merging across the turn would."""

        def encode(self, text: str, add_bos: bool = False) -> list[int]:
            ids = super().encode(text, add_bos)
            return [*ids[:-1], 6] if text.endswith("assistant\n") else ids

    merging = Merging.__new__(Merging)
    merging.__dict__.update(tokenizer.__dict__)
    chat = conversations(1)[0]
    with pytest.raises(FidelError, match=r"conversation c0: tokenisation is not prefix-stable"):
        encode_conversation(merging, chat["messages"], None, "c0")


def test_pack_right_pads_and_truncation_counts(tokenizer: BPETokenizer) -> None:
    examples = [Example(np.arange(n) + 10, np.arange(n) + 100) for n in (5, 4, 3, 6)]
    inputs, targets = pack(examples, 8, PAD_ID)
    assert inputs.shape == (3, 8)  # next-fit: [5], [4, 3], [6]
    assert inputs[0].tolist() == [10, 11, 12, 13, 14, PAD_ID, PAD_ID, PAD_ID]
    assert targets[0].tolist() == [100, 101, 102, 103, 104, *[IGNORE_INDEX] * 3]
    assert inputs[1].tolist() == [10, 11, 12, 13, 10, 11, 12, PAD_ID]
    assert targets[2, 6:].tolist() == [IGNORE_INDEX] * 2

    chats = conversations(3)
    full, stats = tokenize_conversations(chats, tokenizer, 10_000)
    assert stats.truncated == stats.dropped == 0 and len(full) == 3
    shortest = min(len(e.inputs) for e in full)
    cut, stats = tokenize_conversations(chats, tokenizer, shortest - 5)
    assert stats.truncated + stats.dropped == 3 and all(len(e.inputs) == shortest - 5 for e in cut)
    tiny, stats = tokenize_conversations(chats, tokenizer, 8)  # the system prompt alone is longer
    assert tiny == [] and stats.dropped == 3
    example = full[0]
    ids, mask = encode_conversation(tokenizer, chats[0]["messages"])
    assert example.inputs.tolist() == ids[:-1]
    assert example.targets.tolist() == [
        t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:], strict=True)
    ]


def test_order_is_deterministic_and_resumes(tokenizer: BPETokenizer) -> None:
    examples = [Example(np.full(30, i), np.full(30, i)) for i in range(12)]  # 30 tokens: one per row of 40

    def make(seed: int = 0) -> ConversationBatches:
        return ConversationBatches([Example(e.inputs, e.targets) for e in examples], 40, 1, seed, PAD_ID)

    first, second = make(), make()
    assert first.steps_per_epoch == 12  # one conversation of 30 per row of 40
    run = [first.next_batch()[0][0, 0].item() for _ in range(24)]
    assert sorted(run[:12]) == sorted(run[12:]) == list(range(12)) and run[:12] != run[12:]
    for _ in range(7):
        second.next_batch()
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(second.state_dict())))
    assert [resumed.next_batch()[0][0, 0].item() for _ in range(10)] == run[7:17]
    assert [make(1).next_batch()[0][0, 0].item() for _ in range(12)] != run[:12]
    with pytest.raises(FidelError, match="fewer than one batch"):
        ConversationBatches(examples[:1], 40, 2, 0, PAD_ID)


@pytest.fixture()
def sft_run(tmp_path: Path, tokenizer_dir: Path) -> dict[str, Path]:
    """A data run with RUN/chat/{train,eval}.jsonl, an exported random base model and an SFT output."""
    run = tmp_path / "run"
    (run / "chat").mkdir(parents=True)
    chats = conversations(14)
    for name, part in (("train", chats[:10]), ("eval", chats[10:])):
        text = "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in part)
        (run / "chat" / f"{name}.jsonl").write_text(text, encoding="utf-8")
    config = gqa_config(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=256)
    base = export_hf(
        random_llama(config, random_norms=False), config, tokenizer_dir, tmp_path / "base", "float32"
    )
    output = tmp_path / "sft"
    prepare_output(output, str(base))
    return {"run": run, "base": base, "output": output}


def sft_config(paths: dict[str, Path], steps: int, **extra: Any) -> TrainConfig:
    return TrainConfig(
        data="chat", chat_dir=str(paths["run"] / "chat"), base=str(paths["base"]), batch_size=2,
        max_steps=steps, lr=1e-2, warmup_steps=0, eval_every=2, eval_batches=2, log_every=1, save_every=2,
        device="cpu", echo=False, **{"seq_len": SEQ, **extra},
    )  # fmt: skip


def masked_val_loss(model: torch.nn.Module, chat_dir: Path, tokenizer_dir: Path) -> float:
    """Mean NLL over the assistant targets of eval.jsonl, computed here without the training loop."""
    from fidellm.sft.data import chat_validation_batches, read_conversations

    tokenizer = load_tokenizer(tokenizer_dir)
    examples, _ = tokenize_conversations(read_conversations(chat_dir / "eval.jsonl"), tokenizer, SEQ)
    nll, count = 0.0, 0
    for inputs, targets in chat_validation_batches(examples, SEQ, 2, 2, PAD_ID).batches:
        with torch.no_grad():
            logits = model(inputs).logits
        kept = targets != IGNORE_INDEX
        nll += torch.nn.functional.cross_entropy(logits[kept], targets[kept], reduction="sum").item()
        count += int(kept.sum())
    return nll / count


def test_full_sft_two_steps_and_resume(sft_run: dict[str, Path]) -> None:
    base, _ = load_model(sft_run["base"])
    summary = train(sft_run["output"], sft_config(sft_run, 2))
    assert summary["step"] == 2 and all(np.isfinite(summary["losses"]))
    tuned, tokenizer_dir = load_model(sft_run["output"])
    assert tokenizer_dir == sft_run["output"] / "tokenizer"
    changed = [n for n, p in tuned.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert "model.layers.0.self_attn.q_proj.weight" in changed and "model.norm.weight" in changed
    expected = masked_val_loss(tuned, sft_run["run"] / "chat", tokenizer_dir)
    assert summary["val_loss"] == pytest.approx(expected, rel=1e-5)  # the loop's eval is masked the same
    again = train(sft_run["output"], sft_config(sft_run, 3))
    assert again["resumed_from"] == 2 and again["step"] == 3


def test_lora_trains_only_adapters_and_merges(sft_run: dict[str, Path]) -> None:
    spec = lora_spec(4, 8.0, "q_proj,v_proj,down_proj")
    summary = train(sft_run["output"], sft_config(sft_run, 2, lora=spec))
    assert summary["step"] == 2
    base = load_file(str(sft_run["base"] / "model.safetensors"))
    checkpoint = read_checkpoint(latest_checkpoint(sft_run["output"] / "train" / "checkpoints"))
    weights = load_file(str(checkpoint.path / "model.safetensors"))
    lora_names = [n for n in weights if ".lora_" in n]
    assert len(lora_names) == 2 * 3 * 2  # A and B, 3 targets, 2 layers
    assert all(not torch.equal(weights[n], torch.zeros_like(weights[n])) for n in lora_names if "lora_B" in n)
    for name, tensor in weights.items():
        if ".lora_" not in name:  # every base weight is untouched
            assert torch.equal(tensor, base[name.replace(".base_layer", "")]), name

    model = apply_lora(build_model(config_from_dict(checkpoint.state["model_config"])), spec)
    restore_checkpoint(checkpoint, model, restore_rng=False)
    ids = torch.tensor([tokenizer_ids(sft_run)])
    with torch.no_grad():
        unmerged = model.eval()(ids).logits
        merged_dir = merge_run(sft_run["output"])
        merged, _ = load_model(merged_dir)
        assert (merged(ids).logits - unmerged).abs().max().item() <= 1e-5
        assert not any(".lora_" in n for n in merged.state_dict())
        assert (merge_lora(model)(ids).logits - unmerged).abs().max().item() <= 1e-5
    again = train(sft_run["output"], sft_config(sft_run, 3, lora=spec))  # LoRA checkpoints resume
    assert again["resumed_from"] == 2 and again["step"] == 3


def tokenizer_ids(paths: dict[str, Path]) -> list[int]:
    chat = json.loads((paths["run"] / "chat" / "eval.jsonl").read_text(encoding="utf-8").splitlines()[0])
    tokenizer = load_tokenizer(paths["output"] / "tokenizer")
    return tokenizer.encode(render_chat(chat["messages"], chat.get("tools")))[:SEQ]


def test_cli_lora_run_and_user_errors(sft_run: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "cli_sft"
    args = ["sft", str(sft_run["run"]), "--base", str(sft_run["base"]), "--output-dir", str(out)]
    common = ["--seq-len", str(SEQ), "--batch-size", "2", "--device", "cpu", "--eval-batches", "1"]
    result = CliRunner().invoke(cli, [*args, *common, "--use-lora", "--lora-rank", "2", "--max-samples", "6"])
    assert result.exit_code == 0, result.output
    assert "merged LoRA model:" in result.output and (out / "merged" / "model.safetensors").is_file()
    config = json.loads((out / "train" / "config.json").read_text())["train"]
    assert config["lora"]["rank"] == 2 and config["max_steps"] >= 1 and config["max_samples"] == 6
    assert config["preset"] is None  # the base's own config trained, whatever --preset's default says
    result = CliRunner().invoke(cli, [*args, *common, "--use-lora", "--lora-targets", "qkv"])
    assert result.exit_code != 0 and "--lora-targets" in str(result.exception)


def test_sft_keeps_a_weight_average_and_merges_it(sft_run: dict[str, Path], tmp_path: Path) -> None:
    """`fidellm sft --ema-decay`: each checkpoint keeps the averaged weights, and LoRA merges the averaged
    adapters, also from the latest checkpoint of a run that has no train/best (it never evaluated)."""
    out = tmp_path / "ema_sft"
    args = ["sft", str(sft_run["run"]), "--base", str(sft_run["base"]), "--output-dir", str(out), "--seq-len",
            str(SEQ), "--batch-size", "2", "--device", "cpu", "--eval-batches", "1", "--use-lora",
            "--lora-rank", "2", "--epochs", "2", "--lr", "1e-2", "--warmup", "0", "--ema-decay", "0.5",
            "--no-merge"]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "train" / "config.json").read_text())["train"]["ema_decay"] == 0.5
    latest = read_checkpoint(latest_checkpoint(out / "train" / "checkpoints"))
    trained, averaged = (
        load_file(str(latest.path / name)) for name in ("model.safetensors", "average.safetensors")
    )
    adapters = [name for name in trained if ".lora_B" in name]
    assert adapters and all(not torch.equal(trained[n], averaged[n]) for n in adapters)
    for directory in (out / "train" / "best", out / "merged"):  # as if it had never evaluated
        shutil.rmtree(directory, ignore_errors=True)
    merged = load_file(str(merge_run(out) / "model.safetensors"))
    spec = latest.state["train_config"]["lora"]
    model = apply_lora(build_model(config_from_dict(latest.state["model_config"])), spec)
    restore_checkpoint(latest, model, restore_rng=False, weights_file="average.safetensors")
    expected = merge_lora(model).state_dict()
    assert all(torch.equal(merged[name], expected[name]) for name in merged)


@pytest.mark.parametrize("index", [0, 2])
def test_byte_tokenizer_masks_the_assistant_bytes(index: int) -> None:
    """H-Net chats: the markers are literal bytes after the BOS byte; the mask covers exactly each
    assistant turn's bytes through its closing `<|im_end|>`, as with the BPE's single ids."""
    tokenizer = ByteTokenizer()
    chat = conversations(3)[index]
    ids, mask = encode_conversation(tokenizer, chat["messages"], chat.get("tools"), chat["id"])
    text = render_chat(chat["messages"], chat.get("tools"))
    assert ids == [BYTE_BOS_ID, *text[len(BOS) :].encode("utf-8")]
    assert encode_chat(tokenizer, text) == ids
    header = f"{IM_START}assistant\n"
    expected = [part.split(IM_END)[0] + IM_END for part in text.split(header)[1:]]
    assert [bytes(ids[a:b]).decode("utf-8") for a, b in spans(mask)] == expected


def hnet_base(tmp_path: Path) -> Path:
    """A run directory holding a random hnet-tiny checkpoint and the byte tokenizer."""
    torch.manual_seed(0)
    model = HNetForCausalLM(hnet_preset("hnet-tiny", max_position_embeddings=512))
    base = tmp_path / "hnet-base"
    ByteTokenizer().save(base / "tokenizer")
    state = {"data": {}, "model_config": config_to_dict(model.config)}
    optimizer = torch.optim.AdamW(model.parameters())
    save_checkpoint(base / "train" / "checkpoints", 1, model, optimizer, state, keep_last=1)
    return base


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_hnet_lora_and_qlora_sft_merge_the_best_weights(
    sft_run: dict[str, Path], quantize: str | None
) -> None:
    """H-Net takes the same SFT command: LoRA (default targets: its mixer and MLP projections) or QLoRA
    (those projections in 4-bit NF4, skip path and routers in full precision); the merged model is the
    best-validation one and computes what the adapted model computed."""
    if quantize:
        pytest.importorskip("bitsandbytes")
    base = hnet_base(sft_run["output"].parent)
    output = sft_run["output"].parent / f"hnet-sft-{quantize}"
    prepare_output(output, str(base))
    spec = lora_spec(4, 8.0, quantize=quantize)
    paths = {**sft_run, "base": base}
    summary = train(output, sft_config(paths, 4, lora=spec, seq_len=256))
    assert summary["step"] == 4 and all(np.isfinite(summary["losses"]))
    checkpoint = read_checkpoint(latest_checkpoint(output / "train" / "checkpoints"))
    names = load_file(str(checkpoint.path / "model.safetensors")).keys()
    assert {n.split(".lora_")[0].rsplit(".", 1)[1] for n in names if ".lora_" in n} == {
        "Wqkv", "out_proj", "in_proj", "fc1", "fc2"
    }  # fmt: skip
    if quantize:  # the 4-bit base is not stored: it is rebuilt from the base model
        assert not any(".absmax" in n or "quant_state" in n for n in names)
        assert "backbone.residual_proj.weight" in names
    model, _ = load_model(base)
    model = apply_lora(model, spec)
    best = read_checkpoint(output / "train" / "best")
    restore_checkpoint(best, model, restore_rng=False)
    if quantize:
        layer = model.backbone.encoder.layers[0].mixer.in_proj.base_layer
        assert getattr(layer.weight, "quant_state", None) is not None
    ids = torch.tensor([ByteTokenizer().encode("ሰላም፣ እንዴት ነህ? " * 3, add_bos=True)])
    with torch.no_grad():
        adapted = model.eval()(ids).logits
        merged_dir = merge_run(output)
        merged, _ = load_model(merged_dir)
        assert (merged(ids).logits - adapted).abs().max().item() <= 1e-4
    state = json.loads((merged_dir / "state.json").read_text())
    assert state["merged_from"] == str(output / "train" / "best") and state["step"] == summary["best"]["step"]
    again = train(output, sft_config(paths, 5, lora=spec, seq_len=256))  # resumes, 4-bit base rebuilt
    assert again["resumed_from"] == 4 and again["step"] == 5


def test_qlora_on_llama_freezes_a_4bit_base(sft_run: dict[str, Path]) -> None:
    pytest.importorskip("bitsandbytes")
    spec = lora_spec(4, 8.0, "q_proj,v_proj", quantize="nf4")
    model = apply_lora(load_model(sft_run["base"])[0], spec)
    projections = [m for n, m in model.named_modules() if n.endswith(("k_proj", "o_proj", "down_proj"))]
    assert projections and all(getattr(m.weight, "quant_state", None) is not None for m in projections)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if ".lora_" in n
    }
    with pytest.raises(FidelError, match="quantize must be one of"):
        lora_spec(4, 8.0, quantize="int3")
    with pytest.raises(FidelError, match="name no Linear layer"):
        apply_lora(load_model(sft_run["base"])[0], lora_spec(4, 8.0, "Wqkv"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_qlora_sft_on_cuda(sft_run: dict[str, Path]) -> None:
    """QLoRA where it is meant to run: NF4 base on the GPU with bf16 compute, two steps, then the merge
    equals the adapted model (bf16 compute: a looser tolerance than on CPU)."""
    pytest.importorskip("bitsandbytes")
    spec = lora_spec(4, 8.0, quantize="nf4")
    config = sft_config(sft_run, 2, lora=spec)
    summary = train(sft_run["output"], dataclasses.replace(config, device="cuda"))
    assert summary["step"] == 2 and all(np.isfinite(summary["losses"]))
    model = apply_lora(load_model(sft_run["base"], device="cuda")[0], spec)
    restore_checkpoint(read_checkpoint(sft_run["output"] / "train" / "best"), model, restore_rng=False)
    ids = torch.tensor([tokenizer_ids(sft_run)], device="cuda")
    with torch.no_grad():
        adapted = model.eval()(ids).logits.float()
        merged, _ = load_model(merge_run(sft_run["output"]), device="cuda")
        assert (merged(ids).logits.float() - adapted).abs().max().item() <= 5e-2
