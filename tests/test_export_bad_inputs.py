"""Export refusals a first-time user meets: each one line that names the real cause."""

from __future__ import annotations

from pathlib import Path

import pytest

from fidellm.errors import FidelError
from fidellm.export.gguf import export_gguf
from fidellm.export.hf import export_hf
from fidellm.tokenizer.bytes import ByteTokenizer
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
