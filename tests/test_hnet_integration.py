"""H-Net through the shared stages: loading (run, checkpoint, export), `export hnet`, the generation
engine and `fidellm eval`, all on a random tiny H-Net with the byte tokenizer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fidellm.cli import main
from fidellm.errors import FidelError
from fidellm.export.hnet import export_hnet, load_hnet_dir
from fidellm.generate import GenerationConfig, generate, stream_generate
from fidellm.models.factory import config_to_dict
from fidellm.models.hnet import HNetForCausalLM, preset
from fidellm.models.load import load_model
from fidellm.paths import resolve_data_dir
from fidellm.tokenizer.base import load_tokenizer
from fidellm.tokenizer.bytes import ByteTokenizer
from fidellm.tokenizer.report import flores_lines
from fidellm.train.checkpoint import save_checkpoint

PROMPT = "ሰላም"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops run much faster on one thread of the shared test machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_hnet(seed: int = 0, context: int = 1024) -> HNetForCausalLM:
    torch.manual_seed(seed)
    return HNetForCausalLM(preset("hnet-tiny", max_position_embeddings=context)).eval()


@pytest.fixture(scope="module")
def model() -> HNetForCausalLM:
    return tiny_hnet()


@pytest.fixture(scope="module")
def lively() -> HNetForCausalLM:
    """Random matrices of unit gain: greedy outputs vary byte to byte (the default init's are near
    uniform), the router cuts often and BOS (a document start) gets generated mid-sequence."""
    model = tiny_hnet(seed=0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and name != "embeddings.weight":
                param.normal_(0.0, param.shape[1] ** -0.5)
    return model


@pytest.fixture(scope="module")
def run(model: HNetForCausalLM, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory as `fidellm train --arch hnet` leaves it: tokenizer/ and one checkpoint."""
    run = tmp_path_factory.mktemp("hnet") / "run"
    ByteTokenizer().save(run / "tokenizer")
    state = {"data": {}, "model_config": config_to_dict(model.config)}
    optimizer = torch.optim.AdamW(model.parameters())
    save_checkpoint(run / "train" / "checkpoints", 3, model, optimizer, state, keep_last=1)
    return run


@pytest.fixture(scope="module")
def export_dir(run: Path) -> Path:
    out = run.parent / "export"
    main(["export", "hnet", str(run), str(out), "--dtype", "float32"])
    return out


def logits_of(model: torch.nn.Module, text: str = PROMPT * 5) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ByteTokenizer().encode(text, add_bos=True)])).logits


def test_load_model_rebuilds_the_hnet_from_a_run_and_a_checkpoint(model, run):
    loaded, tokenizer_dir = load_model(run)
    assert isinstance(loaded, HNetForCausalLM) and tokenizer_dir == run / "tokenizer"
    assert loaded.config == model.config
    torch.testing.assert_close(logits_of(loaded), logits_of(model), atol=0, rtol=0)
    checkpoint = next((run / "train" / "checkpoints").iterdir())
    again, tokenizer_dir = load_model(checkpoint)
    assert tokenizer_dir == run / "tokenizer"
    torch.testing.assert_close(logits_of(again), logits_of(model), atol=0, rtol=0)


def test_export_round_trip_keeps_logits(model, export_dir):
    loaded, tokenizer_dir = load_model(export_dir)
    assert tokenizer_dir == export_dir and isinstance(load_tokenizer(export_dir), ByteTokenizer)
    torch.testing.assert_close(logits_of(loaded), logits_of(model), atol=0, rtol=0)
    config = json.loads((export_dir / "config.json").read_text(encoding="utf-8"))
    assert config["arch"] == "hnet" and config["model_type"] == "fidellm-hnet"
    assert config["architectures"] == ["HNetForCausalLM"] and config["dtype"] == "float32"
    assert config["arch_layout"] == "m2,[T2],m2" and config["d_model"] == [128, 192]
    with safe_open(str(export_dir / "model.safetensors"), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
        assert set(handle.keys()) == set(model.state_dict())


def test_bfloat16_export_keeps_the_skip_path_in_fp32(model, run, tmp_path):
    out = export_hnet(model, run / "tokenizer", tmp_path / "bf16", dtype="bfloat16")
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        assert handle.get_tensor("backbone.residual_proj.weight").dtype == torch.float32
        assert handle.get_tensor("backbone.encoder.layers.0.mixer.in_proj.weight").dtype == torch.bfloat16
    loaded = load_hnet_dir(out)
    diff = (logits_of(loaded) - logits_of(model)).abs().max().item()
    assert 0 < diff < 0.5  # bf16 rounding: close, not equal


def test_export_errors_name_the_problem(model, run, tmp_path, capsys):
    with pytest.raises(FidelError, match="reads bytes, but this is a bpe tokenizer"):
        bpe_dir = tmp_path / "tok"
        bpe_dir.mkdir()
        (bpe_dir / "fidellm_tokenizer.json").write_text('{"kind": "bpe"}', encoding="utf-8")
        export_hnet(model, bpe_dir, tmp_path / "out")
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "hf", str(run), str(tmp_path / "hf")])
    assert exit_info.value.code == 2 and "fidellm export hnet" in capsys.readouterr().err
    broken = tmp_path / "broken"
    export_hnet(model, run / "tokenizer", broken, dtype="float32")
    config = json.loads((broken / "config.json").read_text(encoding="utf-8"))
    (broken / "config.json").write_text(json.dumps({**config, "d_model": [128, 384]}), encoding="utf-8")
    with pytest.raises(FidelError, match=r"model\.safetensors: does not match"):
        load_model(broken)


def reference_greedy(model: HNetForCausalLM, prompt: list[int], steps: int, stops: set[int]) -> list[int]:
    """Greedy decoding by a full forward pass over the whole sequence at every step (no cache)."""
    ids = list(prompt)
    out: list[int] = []
    for _ in range(steps):
        with torch.no_grad():
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        out.append(token)
        if token in stops:
            break
        ids.append(token)
    return out


def test_cached_greedy_batch_equals_full_forward_argmax(lively):
    tokenizer = ByteTokenizer()
    prompts = [tokenizer.encode(PROMPT, add_bos=True), tokenizer.encode(PROMPT * 3 + " ነው", add_bos=True)]
    # EOS only (a BOS ends generation by default): a document must start during the cached steps
    config = GenerationConfig(max_new_tokens=24, temperature=0.0, stop_token_ids=(tokenizer.eos_id,))
    results = generate(lively, tokenizer, prompts, config)
    for prompt, result in zip(prompts, results, strict=True):
        assert result.token_ids == reference_greedy(lively, prompt, 24, {tokenizer.eos_id})
        assert len(set(result.token_ids)) > 10  # a varied continuation, not one repeated byte
    assert tokenizer.bos_id in results[0].token_ids  # a document starts during the cached steps
    alone = generate(lively, tokenizer, [prompts[1]], config)[0]
    assert alone.token_ids == results[1].token_ids


def test_sampling_seeds_stops_and_streaming_work_on_hnet(lively):
    tokenizer = ByteTokenizer()
    config = GenerationConfig(max_new_tokens=30, temperature=1.0, seed=7)
    batch = generate(lively, tokenizer, [PROMPT, PROMPT + PROMPT], config)
    alone = generate(lively, tokenizer, [PROMPT + PROMPT], GenerationConfig(max_new_tokens=30, seed=8))[0]
    assert batch[1].token_ids == alone.token_ids  # row i draws with seed + i
    assert "".join(stream_generate(lively, tokenizer, PROMPT, config)) == batch[0].text
    stop = next(c for c in batch[0].text[3:] if c.isascii() and c.isprintable())
    stopped = generate(lively, tokenizer, [PROMPT], GenerationConfig(30, seed=7, stop_strings=(stop,)))[0]
    assert stopped.finish_reason == "stop" and stopped.stop == stop
    assert stopped.text == batch[0].text[: batch[0].text.index(stop)]


def test_generate_command_on_run_and_export(run, export_dir, capsys):
    for path in (run, export_dir):
        main(["generate", str(path), PROMPT, "--max-new-tokens", "12", "--seed", "1", "--device", "cpu"])
        out = capsys.readouterr().out
        assert out.startswith(PROMPT) and "\ufffd" not in out[: len(PROMPT)]


def test_eval_command_scores_all_flores_lines(run, tmp_path, capsys):
    """`fidellm eval RUN --tasks flores --limit 5`: the limit does not apply to FLORES (all 2009 lines)."""
    out = tmp_path / "eval"
    main(["eval", str(run), "--tasks", "flores", "--limit", "5", "--out", str(out), "--device", "cpu"])
    capsys.readouterr()
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))["results"]
    metrics = {r["metric"]: r for r in results if r["task"] == "flores"}
    assert set(metrics) == {"second_half_bits", "bits_per_byte", "bits_per_char"}
    lines = flores_lines(resolve_data_dir())
    for result in metrics.values():
        assert result["n"] == len(lines) == 2009 and math.isfinite(result["value"])
        assert result["details"]["tokens"] == sum(len(line.encode("utf-8")) for line in lines)
    # an untrained model is near uniform over 256 bytes: about 8 bits per byte
    assert 7.0 < metrics["bits_per_byte"]["value"] < 9.0
    assert metrics["second_half_bits"]["value"] > 0


def test_features_are_the_states_the_lm_head_reads(lively):
    from fidellm.eval.downstream.heads import features_of

    ids = torch.tensor([ByteTokenizer().encode(PROMPT * 3, add_bos=True)])
    with torch.no_grad():
        hidden = features_of(lively)(ids)
        torch.testing.assert_close(lively.lm_head(hidden), lively(ids).logits, rtol=0, atol=1e-6)
    shared = {id(p) for p in lively.parameters()}
    assert all(id(p) in shared for p in features_of(lively).parameters())  # a view, not a copy
