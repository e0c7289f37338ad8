"""`fidellm generate` as the user sees it: stdout and stderr of the command on a tiny exported model."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from fidellm.cli import main
from fidellm.export.hf import export_hf
from fidellm.generate import engine
from fidellm.tokenizer.bytes import ByteTokenizer
from fixtures.bpe import flores_bpe
from fixtures.models import gqa_config, random_llama


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Llama with a 32-token context and a 512-id FLORES BPE, exported as a HF directory."""
    root = tmp_path_factory.mktemp("generate_cli")
    flores_bpe(root / "tokenizer", 512, lines=100)
    config = gqa_config(vocab_size=512, max_position_embeddings=32, num_hidden_layers=1)
    export_hf(random_llama(config), config, root / "tokenizer", root / "model", dtype="float32")
    return root / "model"


def test_a_prompt_too_long_prints_only_the_error(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The prompt is not echoed to stdout before the error (which then ran into it on one line)."""
    prompt = "ኢትዮጵያ በምሥራቅ አፍሪካ የምትገኝ አገር ናት፤ ዋና ከተማዋ አዲስ አበባ ነው።"
    with pytest.raises(SystemExit) as exited:
        main(["generate", str(model_dir), prompt, "--device", "cpu", "--max-new-tokens", "30"])
    captured = capsys.readouterr()
    assert exited.value.code == 2 and captured.out == ""
    assert captured.err.startswith("error: generation: prompt 0 has ") and captured.err.count("\n") == 1


def test_one_prompt_streams_after_the_prompt(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["generate", str(model_dir), "ሰላም", "--device", "cpu", "--max-new-tokens", "5", "--seed", "0"])
    first = capsys.readouterr().out
    main(["generate", str(model_dir), "ሰላም", "--device", "cpu", "--max-new-tokens", "5", "--seed", "0"])
    assert capsys.readouterr().out == first and first.startswith("ሰላም") and first.endswith("\n")


def test_a_tokenizer_larger_than_the_model_is_named_not_an_index_error(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run whose tokenizer was retrained after its checkpoint: ids beyond the model's embedding."""
    mixed = tmp_path / "mixed"
    shutil.copytree(model_dir, mixed)
    for name in ("tokenizer.json", "fidellm_tokenizer.json"):
        (mixed / name).unlink()
    larger = flores_bpe(tmp_path / "larger", 1024)
    assert larger.vocab_size > 512
    larger.save(mixed)
    with pytest.raises(SystemExit) as exited:
        main(["generate", str(mixed), "ኢትዮጵያ በምሥራቅ አፍሪካ", "--device", "cpu", "--max-new-tokens", "3"])
    captured = capsys.readouterr()
    assert exited.value.code == 2 and captured.out == ""
    assert captured.err == (
        f"error: generation: the tokenizer has {larger.vocab_size:,} ids and the model only 512: it is not"
        " the tokenizer this model was trained with\n"
    )


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["ሰላም\udcff"], "prompt 1"),
        (["ሰላም", "\udce1\udc88"], "prompt 2"),
        (["ሰላም", "--stop", "x\udcff"], "--stop"),
    ],
)
def test_command_line_text_that_is_not_utf8_is_named(
    model_dir: Path, capsys: pytest.CaptureFixture[str], args: list[str], named: str
) -> None:
    """Bytes that are not UTF-8 reach Python's argv as lone surrogates (surrogateescape), which the
    tokenizer cannot encode: one line naming the argument, not a TypeError from `tokenizers`."""
    with pytest.raises(SystemExit) as exited:
        main(["generate", str(model_dir), *args, "--device", "cpu", "--max-new-tokens", "3"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.startswith(f"error: {named} is not valid UTF-8 (byte 0x")
    assert err.count("\n") == 1


def test_the_repetition_penalty_defaults_off_for_a_byte_model(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1.1 over BPE tokens, 1.0 over bytes (every Ethiopic character starts with 0xE1, which a byte
    penalty would push down after the first one); a value given is used for both."""
    import fidellm.models.load as load

    seen: list[float] = []
    real_generate = engine.generate

    def record(model: object, tokenizer: object, prompts: list[str], config: engine.GenerationConfig) -> list:
        seen.append(config.repetition_penalty)
        return real_generate(model, tokenizer, prompts, dataclasses.replace(config, max_new_tokens=1))

    monkeypatch.setattr(engine, "generate", record)
    ByteTokenizer().save(tmp_path / "bytes")
    byte_model = random_llama(gqa_config(vocab_size=256, max_position_embeddings=32, num_hidden_layers=1))
    real_load = load.load_model
    for given in ([], ["--repetition-penalty", "1.3"]):
        monkeypatch.setattr(load, "load_model", real_load)
        main(["generate", str(model_dir), "ሰላም", "ሰላም", "--device", "cpu", *given])
        monkeypatch.setattr(load, "load_model", lambda path, device=None: (byte_model, tmp_path / "bytes"))
        main(["generate", str(model_dir), "ሰላም", "ሰላም", "--device", "cpu", *given])
    assert seen == [1.1, 1.0, 1.3, 1.3]
