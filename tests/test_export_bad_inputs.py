"""Export refusals a first-time user meets: each one line that names the real cause."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
import transformers

from fidellm.errors import FidelError
from fidellm.export.gguf import export_gguf
from fidellm.export.hf import export_hf, load_hf_dir
from fidellm.paths import resolve_data_dir
from fidellm.tokenizer.bpe import train_bpe
from fidellm.tokenizer.bytes import ByteTokenizer
from fixtures.cli import fails_with
from fixtures.models import gqa_config, random_llama


def test_a_llama_on_the_byte_tokenizer_is_refused_by_name(tmp_path: Path) -> None:
    ByteTokenizer().save(tmp_path / "tokenizer")
    model = random_llama(gqa_config(vocab_size=256, num_hidden_layers=1))
    message = r"tokenizer: {} export writes a BPE tokenizer, but this is a bytes tokenizer"
    with pytest.raises(FidelError, match=message.format("HF")):  # was: tokenizer.json does not exist
        export_hf(model, model.config, tmp_path / "tokenizer", tmp_path / "hf")
    with pytest.raises(FidelError, match=message.format("GGUF")):
        export_gguf(model, model.config, tmp_path / "tokenizer", tmp_path / "m.gguf")
    assert not (tmp_path / "hf").exists() and not (tmp_path / "m.gguf").exists()


def test_a_weight_beyond_float16_is_refused_by_name(tmp_path: Path) -> None:
    """float16 stops at ±65504: such a weight became inf in the exported file (GGUF f16 refused it)."""
    from fidellm.export.hnet import export_hnet
    from fidellm.models.hnet import HNetForCausalLM
    from fidellm.models.hnet import preset as hnet_preset

    lines = (resolve_data_dir() / "flores200" / "amh_Ethi.dev").read_text(encoding="utf-8").splitlines()
    train_bpe(lines[:100], 512, show_progress=False).save(tmp_path / "bpe")
    ByteTokenizer().save(tmp_path / "bytes")
    llama = random_llama(gqa_config(vocab_size=512, num_hidden_layers=1))
    hnet = HNetForCausalLM(hnet_preset("hnet-tiny", max_position_embeddings=64))
    with torch.no_grad():
        llama.model.layers[0].mlp.up_proj.weight[0, 0] = 1e5
        next(p for n, p in hnet.named_parameters() if n.endswith("weight") and p.ndim == 2)[0, 0] = -1e5
    with pytest.raises(FidelError, match=r"weight model\.layers\.0\.mlp\.up_proj\.weight has values beyond"):
        export_hf(llama, llama.config, tmp_path / "bpe", tmp_path / "hf16", dtype="float16")
    with pytest.raises(FidelError, match=r"beyond the float16 range \(±65504\); export --dtype bfloat16"):
        export_hnet(hnet, tmp_path / "bytes", tmp_path / "hnet16", dtype="float16")
    export_hf(llama, llama.config, tmp_path / "bpe", tmp_path / "hf", dtype="bfloat16")  # its range is fp32's


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama exported with a BPE tokenizer trained on FLORES lines."""
    root = tmp_path_factory.mktemp("export-bad")
    lines = (resolve_data_dir() / "flores200" / "amh_Ethi.dev").read_text(encoding="utf-8").splitlines()
    train_bpe(lines[:100], 512, show_progress=False).save(root / "tokenizer")
    model = random_llama(gqa_config(vocab_size=512, num_hidden_layers=1))
    return export_hf(model, model.config, root / "tokenizer", root / "hf", dtype="float32")


def test_outputs_that_cannot_be_written_are_one_line_errors(
    hf_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a file"
    blocker.write_text("x")
    for args in (["export", "hf", str(hf_dir), str(blocker / "hf")],
                 ["export", "gguf", str(hf_dir), str(blocker / "m.gguf")],
                 ["report", str(hf_dir), "--out", str(blocker / "card")],
                 ["eval", str(hf_dir), "--tasks", "flores", "--out", str(blocker / "ev")]):  # fmt: skip
        err = fails_with(args, capsys)  # was a NotADirectoryError / FileExistsError traceback
        assert err.startswith(f"error: {blocker}") and "cannot create the output directory" in err, err
        assert err.count("\n") == 1


def test_gguf_does_not_replace_a_file_that_is_not_regular(
    hf_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pipe = tmp_path / "pipe.gguf"
    os.mkfifo(pipe)  # as /dev/null: the export renamed its file over it (as root, /dev/null itself)
    err = fails_with(["export", "gguf", str(hf_dir), str(pipe)], capsys)
    assert err == f"error: {pipe}: exists and is not a regular file; write the GGUF file elsewhere\n"
    assert stat.S_ISFIFO(pipe.stat().st_mode)


def test_a_transformers_llama_directory_with_a_null_pad_id_loads(tmp_path: Path) -> None:
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    theirs = transformers.LlamaForCausalLM(config).eval()
    theirs.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())  # transformers 4 leaves the null out
    (tmp_path / "config.json").write_text(json.dumps({**saved, "pad_token_id": None}))
    ours, loaded = load_hf_dir(tmp_path)  # was: TypeError '<=' not supported between int and NoneType
    assert (loaded.bos_token_id, loaded.eos_token_id) == (1, (2,))
    ids = torch.tensor([[1, 5, 9, 300]])
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, theirs(ids).logits, atol=1e-5)
    data = json.loads((tmp_path / "config.json").read_text())
    for field, value, message in (
        ("eos_token_id", [2, "x"], "eos_token_id must be a token id"),
        ("bos_token_id", 1.5, "bos_token_id must be a token id"),
        ("rope_theta", "big", "rope_theta must be a number"),
        ("rms_norm_eps", "x", "rms_norm_eps must be a positive number"),  # was a struct.error in gguf
        ("rope_parameters", "x", "rope_parameters must be an object or null"),  # was an AttributeError
        ("rope_scaling", {"type": "linear", "factor": 2.0}, "rope_scaling rope_type 'linear' is not"),
    ):  # the last was ignored beside a default rope_parameters: positions silently scaled otherwise
        (tmp_path / "config.json").write_text(json.dumps({**data, field: value}))
        with pytest.raises(FidelError, match=rf"config\.json: {message}"):
            load_hf_dir(tmp_path)


def test_an_export_into_the_run_it_comes_from_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    lines = (resolve_data_dir() / "flores200" / "amh_Ethi.dev").read_text(encoding="utf-8").splitlines()
    train_bpe(lines[:100], 512, show_progress=False).save(run / "tokenizer")
    model = random_llama(gqa_config(vocab_size=512, num_hidden_layers=1))
    export_hf(model, model.config, run / "tokenizer", run / "train" / "best", dtype="float32")
    (run / "train" / "checkpoints").mkdir()
    for target in (run, tmp_path):  # RUN/config.json + model.safetensors would make RUN load as the export
        err = fails_with(["export", "hf", str(run / "train" / "best"), str(target)], capsys)
        assert err.startswith(f"error: {target}: holds the model being exported"), err
    assert not (run / "config.json").exists()


def test_a_checkpoint_with_damaged_weights_is_named(tmp_path: Path) -> None:
    """A truncated model.safetensors (a copy cut short) was a SafetensorError traceback from the
    LoRA-adapter probe that runs before the weights are read."""
    from fidellm.models.factory import config_to_dict
    from fidellm.models.load import load_model
    from fidellm.train.checkpoint import save_checkpoint

    model = random_llama(gqa_config(vocab_size=512, num_hidden_layers=1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = {"model_config": config_to_dict(model.config)}
    checkpoint = save_checkpoint(tmp_path / "checkpoints", 1, model, optimizer, state, keep_last=1)
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(FidelError, match=r"model\.safetensors: cannot read safetensors"):
        load_model(checkpoint)


@pytest.mark.parametrize("tie", [False, True])
def test_a_config_without_tie_word_embeddings_loads_as_its_weights_say(tmp_path: Path, tie: bool) -> None:
    """transformers reads an absent tie_word_embeddings as untied (LlamaConfig's default): such a
    directory with its own lm_head.weight was refused ("tie_word_embeddings is set but lm_head.weight
    differs"); one without lm_head.weight can only be tied."""
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=64, tie_word_embeddings=tie,
    )  # fmt: skip
    theirs = transformers.LlamaForCausalLM(config).eval()
    theirs.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["tie_word_embeddings"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    ours, loaded = load_hf_dir(tmp_path)
    assert loaded.tie_word_embeddings is tie
    ids = torch.tensor([[1, 5, 9, 300]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-5, rtol=1e-5)


def test_export_hnet_of_a_llama_points_to_hf_and_leaves_no_directory(
    hf_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It was refused only after the output directory had been made (an empty one stayed behind)."""
    err = fails_with(["export", "hnet", str(hf_dir), str(tmp_path / "out")], capsys)
    assert err.startswith("error: H-Net export needs an H-Net model; this is LlamaForCausalLM"), err
    assert "fidellm export hf MODEL OUT_DIR" in err
    assert not (tmp_path / "out").exists()


def test_a_refused_cli_export_leaves_no_output_behind(
    hf_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The commands made the output directory before the exporter's checks ran: an empty directory
    (or GGUF parent) stayed behind after the refusal."""
    model, config = load_hf_dir(hf_dir)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = 1e5
    big = export_hf(model, config, hf_dir, tmp_path / "big", dtype="float32")
    err = fails_with(["export", "hf", str(big), str(tmp_path / "out" / "hf"), "--dtype", "float16"], capsys)
    assert "beyond the float16 range" in err, err
    err = fails_with(["export", "gguf", str(big), str(tmp_path / "out" / "m.gguf"), "--type", "f16"], capsys)
    assert "beyond the f16 range" in err, err
    assert not (tmp_path / "out").exists()
