"""Hugging Face export: transformers loads the directory, computes our logits, tokenizes and generates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

from fidellm.errors import FidelError
from fidellm.export.hf import export_hf, hf_config, load_hf_dir
from fidellm.models.llama import IGNORE_INDEX, LlamaConfig, LlamaForCausalLM
from fidellm.paths import resolve_data_dir
from fidellm.tokenizer.bpe import BPETokenizer, train_bpe
from fixtures.models import gqa_config, random_llama

VOCAB = 768
PARITY_ATOL = 1e-5


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small BPE trained on the real FLORES-200 Amharic dev set, saved as the tokenizer stage does."""
    lines = (resolve_data_dir() / "flores200" / "amh_Ethi.dev").read_text(encoding="utf-8").splitlines()
    directory = tmp_path_factory.mktemp("tokenizer")
    train_bpe(lines, VOCAB, show_progress=False).save(directory)
    return directory


def random_model(tie: bool = True, seed: int = 0) -> tuple[LlamaForCausalLM, LlamaConfig]:
    """A tiny GQA model with random weights (norm gains too), so every tensor's mapping matters."""
    config = gqa_config(
        vocab_size=VOCAB,
        num_hidden_layers=2,
        max_position_embeddings=128,
        rope_theta=500.0,
        tie_word_embeddings=tie,
    )
    return random_llama(config, seed), config


def amharic_ids(directory: Path) -> torch.Tensor:
    """Token ids (with BOS) of the first two FLORES devtest sentences of 48+ tokens, cut to 48."""
    lines = (resolve_data_dir() / "flores200" / "amh_Ethi.devtest").read_text(encoding="utf-8").splitlines()
    tokenizer = BPETokenizer.load(directory)
    rows = [ids[:48] for ids in tokenizer.encode_batch(lines, add_bos=True) if len(ids) >= 48]
    return torch.tensor(rows[:2])


@pytest.mark.parametrize("tie", [True, False])
def test_transformers_logits_equal_ours(tie: bool, tokenizer_dir: Path, tmp_path: Path) -> None:
    model, config = random_model(tie)
    export_hf(model, config, tokenizer_dir, tmp_path, dtype="float32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    ids = amharic_ids(tokenizer_dir)
    with torch.no_grad():
        theirs = hf(ids, labels=ids)
        ours = model(ids[:, :-1], targets=ids[:, 1:])
        ours_logits = model(ids).logits
    assert (theirs.logits - ours_logits).abs().max().item() <= PARITY_ATOL
    assert abs(theirs.loss.item() - ours.loss.item()) <= PARITY_ATOL
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        assert ("lm_head.weight" in handle.keys()) is not tie  # noqa: SIM118 (not a dict)
        assert handle.metadata() == {"format": "pt"}
    if tie:  # transformers ties the head to the embedding itself
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    else:
        assert torch.equal(hf.lm_head.weight, model.lm_head.weight)


def test_state_dict_loads_directly_into_transformers() -> None:
    model, config = random_model()
    fields = hf_config(config, "float32")
    hf_cfg = transformers.LlamaConfig(
        **{key: value for key, value in fields.items() if key not in ("architectures", "model_type")}
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.load_state_dict(model.state_dict(), strict=True)
    torch.manual_seed(4)
    ids = torch.randint(0, VOCAB, (3, 64))
    with torch.no_grad():
        diff = (hf(ids).logits - model(ids).logits).abs().max().item()
    assert diff <= PARITY_ATOL


def test_tokenizer_loads_and_generate_matches_our_greedy_decoding(
    tokenizer_dir: Path, tmp_path: Path
) -> None:
    model, config = random_model(seed=1)
    export_hf(model, config, tokenizer_dir, tmp_path, dtype="float32")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "ኢትዮጵያ ውስጥ ብዙ ቋንቋዎች ይነገራሉ።"
    encoded = hf_tok(text)["input_ids"]
    assert encoded == BPETokenizer.load(tokenizer_dir).encode(text, add_bos=True)
    assert hf_tok.decode(encoded, skip_special_tokens=True) == text
    assert hf_tok.model_max_length == config.max_position_embeddings
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    prompt = torch.tensor([encoded])
    new_tokens = 8
    # No eos: a random model may emit <|bos|> early; we compare all eight greedy steps.
    theirs = hf.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, do_sample=False,
        eos_token_id=None, pad_token_id=config.pad_token_id,
    )[0, prompt.shape[1] :].tolist()  # fmt: skip
    ours, cache, step = [], model.new_cache(), prompt
    with torch.no_grad():
        for _ in range(new_tokens):
            token = int(model(step, cache=cache).logits[0, -1].argmax())
            ours.append(token)
            step = torch.tensor([[token]])
    assert theirs == ours
    assert isinstance(hf_tok.decode(theirs), str)


def test_bfloat16_export_states_its_dtype(tokenizer_dir: Path, tmp_path: Path) -> None:
    model, config = random_model()
    export_hf(model, config, tokenizer_dir, tmp_path)  # default: bfloat16
    data = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))
    assert data["torch_dtype"] == data["dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        assert {handle.get_tensor(name).dtype for name in handle.keys()} == {torch.bfloat16}  # noqa: SIM118
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype="auto")
    assert hf.dtype == torch.bfloat16
    loaded, loaded_config = load_hf_dir(tmp_path, dtype=torch.bfloat16)
    assert loaded_config == config
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor.to(torch.bfloat16)), name


def test_config_json_follows_the_ecosystem_notes(tokenizer_dir: Path, tmp_path: Path) -> None:
    model, config = random_model()
    export_hf(model, config, tokenizer_dir, tmp_path, dtype="float32")
    data = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))
    assert data["architectures"] == ["LlamaForCausalLM"] and data["model_type"] == "llama"
    assert data["rope_theta"] == 500.0
    assert data["rope_parameters"] == {"rope_theta": 500.0, "rope_type": "default"}
    assert (data["head_dim"], data["num_key_value_heads"], data["tie_word_embeddings"]) == (16, 2, True)
    assert (data["hidden_act"], data["attention_bias"], data["mlp_bias"]) == ("silu", False, False)
    assert data["vocab_size"] % 64 == 0
    generation = json.loads((tmp_path / "generation_config.json").read_text(encoding="utf-8"))
    assert generation == {"bos_token_id": 0, "eos_token_id": [0, 3], "pad_token_id": 1}
    tokenizer_config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tokenizer_config["model_max_length"] == 128
    assert tokenizer_config["model_input_names"] == ["input_ids", "attention_mask"]
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "special_tokens_map.json").is_file()
    loaded, loaded_config = load_hf_dir(tmp_path)
    assert loaded_config == config
    ids = torch.randint(0, VOCAB, (1, 32))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_bad_inputs_are_clear_errors(tokenizer_dir: Path, tmp_path: Path) -> None:
    model, config = random_model()
    with pytest.raises(FidelError, match="dtype 'int8'"):
        export_hf(model, config, tokenizer_dir, tmp_path, dtype="int8")
    small = LlamaConfig(**{**config.__dict__, "vocab_size": 512})
    with pytest.raises(FidelError, match="more than the model's vocab_size 512"):
        export_hf(LlamaForCausalLM(small), small, tokenizer_dir, tmp_path)
    export_hf(model, config, tokenizer_dir, tmp_path, dtype="float32")
    data = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))
    (tmp_path / "config.json").write_text(json.dumps({**data, "num_hidden_layers": 3}), encoding="utf-8")
    with pytest.raises(FidelError, match=r"missing tensors \['model.layers.2"):
        load_hf_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**data, "hidden_size": 32}), encoding="utf-8")
    with pytest.raises(FidelError, match="has shape"):
        load_hf_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**data, "model_type": "gpt2"}), encoding="utf-8")
    with pytest.raises(FidelError, match="model_type is 'gpt2'"):
        load_hf_dir(tmp_path)
    with pytest.raises(FidelError, match="does not exist"):
        load_hf_dir(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text(json.dumps(data), encoding="utf-8")
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(FidelError, match="cannot read safetensors"):
        load_hf_dir(tmp_path)
    assert IGNORE_INDEX == -100
