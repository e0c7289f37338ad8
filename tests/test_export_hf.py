"""Hugging Face export: transformers loads the directory, computes our logits, tokenizes, applies the chat
template and generates (run under transformers 5 by `make test`, under 4.57 by `make test-hf4`); the
serving presets meet vLLM's constraints (docs/export.md)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors import safe_open

from fidellm.chat import CHAT_TEMPLATE, render_chat
from fidellm.errors import FidelError
from fidellm.export.hf import export_hf, hf_config, load_hf_dir
from fidellm.models.llama import LlamaConfig, LlamaForCausalLM, preset
from fidellm.models.loss import IGNORE_INDEX
from fidellm.paths import resolve_data_dir
from fidellm.tokenizer.bpe import BPETokenizer, train_bpe
from fidellm.tokenizer.special import BOS_ID, IM_END, IM_END_ID, IM_START, TOOL_TOKENS
from fixtures.chats import ARGUMENTS, CHATS, WEATHER_TOOL, tool_chat
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
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == 0o644  # readable by a server's user
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
    assert tokenizer_config["chat_template"] == CHAT_TEMPLATE
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
    for field, value in [("num_hidden_layers", "three"), ("max_position_embeddings", -5),
                         ("hidden_size", "abc"), ("num_attention_heads", True)]:  # fmt: skip
        (tmp_path / "config.json").write_text(json.dumps({**data, field: value}), encoding="utf-8")
        with pytest.raises(FidelError, match=rf"config\.json: .*{field} must be a positive integer, got"):
            load_hf_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in data.items() if k != "vocab_size"}))
    with pytest.raises(FidelError, match=r"config\.json: missing field 'vocab_size'"):
        load_hf_dir(tmp_path)
    with pytest.raises(FidelError, match="does not exist"):
        load_hf_dir(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text(json.dumps(data), encoding="utf-8")
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(FidelError, match="cannot read safetensors"):
        load_hf_dir(tmp_path)
    assert IGNORE_INDEX == -100


@pytest.fixture(scope="module")
def chat_export(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An fp32 export of a random tiny model, for the chat-template tests."""
    model, config = random_model(seed=2)
    return export_hf(model, config, tokenizer_dir, tmp_path_factory.mktemp("chat"), dtype="float32")


def hf_chat(tokenizer: Any, messages: list[dict[str, Any]], **kwargs: Any) -> Any:
    """apply_chat_template with the return type pinned: 4.x returns ids and 5.x a dict by default."""
    return tokenizer.apply_chat_template(messages, return_dict=False, **kwargs)


@pytest.mark.parametrize("generation_prompt", [False, True])
@pytest.mark.parametrize("name", list(CHATS))
def test_apply_chat_template_equals_render_chat(
    name: str, generation_prompt: bool, chat_export: Path, tokenizer_dir: Path
) -> None:
    hf_tok = transformers.AutoTokenizer.from_pretrained(chat_export)
    messages, tools = CHATS[name]
    options = {"tools": tools, "add_generation_prompt": generation_prompt}
    text = hf_chat(hf_tok, messages, tokenize=False, **options)
    assert text == render_chat(messages, tools, add_generation_prompt=generation_prompt)
    ids = hf_chat(hf_tok, messages, tokenize=True, **options)
    assert ids == BPETokenizer.load(tokenizer_dir).encode(text)  # the template's BOS, no second one
    assert ids[0] == BOS_ID and ids.count(BOS_ID) == 1
    assert hf_tok.decode(ids) == text


def test_tool_calls_round_trip_through_transformers(chat_export: Path) -> None:
    hf_tok = transformers.AutoTokenizer.from_pretrained(chat_export)
    as_dict = hf_chat(hf_tok, tool_chat(ARGUMENTS), tools=[WEATHER_TOOL], tokenize=False)
    as_string = json.dumps(ARGUMENTS, ensure_ascii=False)
    assert hf_chat(hf_tok, tool_chat(as_string), tools=[WEATHER_TOOL], tokenize=False) == as_dict
    # Servers decode with skip_special_tokens: the tool tags (single ids) stay for the hermes parser.
    ids = hf_chat(hf_tok, tool_chat(ARGUMENTS), tools=[WEATHER_TOOL], tokenize=True)
    kept = hf_tok.decode(ids, skip_special_tokens=True)
    assert IM_START not in kept and IM_END not in kept
    for tag in TOOL_TOKENS:
        assert tag not in hf_tok.all_special_tokens
        assert ids.count(hf_tok.convert_tokens_to_ids(tag)) == as_dict.count(tag) == kept.count(tag) > 0


def test_generate_answers_a_chat_and_stops_at_im_end(tokenizer_dir: Path, tmp_path: Path) -> None:
    model, config = random_model(tie=False, seed=3)
    messages, _ = CHATS["plain"]
    prompt_ids = BPETokenizer.load(tokenizer_dir).encode(render_chat(messages, add_generation_prompt=True))
    with torch.no_grad():
        # Make <|im_end|> outscore the third greedy token wherever that token would win, so greedy
        # decoding ends with <|im_end|> within three steps.
        third = greedy(model, prompt_ids, 3, stop=())[2]
        model.lm_head.weight[IM_END_ID] = 1.01 * model.lm_head.weight[third]
    ours = greedy(model, prompt_ids, 12, stop=config.eos_token_id)
    assert ours[-1] == IM_END_ID and len(ours) <= 3
    export_hf(model, config, tokenizer_dir, tmp_path, dtype="float32")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert list(hf.generation_config.eos_token_id) == [BOS_ID, IM_END_ID]
    inputs = hf_tok.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    assert inputs["input_ids"][0].tolist() == prompt_ids
    output = hf.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert output[0, len(prompt_ids) :].tolist() == ours
    assert hf_tok.decode(ours, skip_special_tokens=True) == hf_tok.decode(ours[:-1])


def greedy(model: LlamaForCausalLM, prompt: list[int], steps: int, stop: tuple[int, ...]) -> list[int]:
    """Our greedy continuation of `prompt`: `steps` tokens, or fewer when one in `stop` comes first."""
    tokens: list[int] = []
    cache, step = model.new_cache(), torch.tensor([prompt])
    with torch.no_grad():
        while len(tokens) < steps and not (tokens and tokens[-1] in stop):
            tokens.append(int(model(step, cache=cache).logits[0, -1].argmax()))
            step = torch.tensor([[tokens[-1]]])
    return tokens


VLLM_HEAD_SIZES = (64, 128)
"""Head sizes every vLLM attention backend takes (FlashAttention, FlashInfer, Triton; docs/export.md)."""
SERVING_PRESETS = ("25m", "chat-512", "85m", "125m", "300m")


@pytest.mark.parametrize("tokenizer_vocab", [32000, 24_001])
@pytest.mark.parametrize("name", SERVING_PRESETS)
def test_serving_presets_meet_vllm_constraints(name: str, tokenizer_vocab: int) -> None:
    config = preset(name, tokenizer_vocab)
    default_dtype = inspect.signature(export_hf).parameters["dtype"].default
    fields = hf_config(config, default_dtype)
    assert fields["architectures"] == ["LlamaForCausalLM"] and fields["model_type"] == "llama"
    assert fields["head_dim"] in VLLM_HEAD_SIZES
    assert fields["num_attention_heads"] % fields["num_key_value_heads"] == 0
    assert fields["vocab_size"] % 64 == 0 and 0 <= fields["vocab_size"] - tokenizer_vocab < 64
    assert fields["torch_dtype"] == fields["dtype"] == "bfloat16"
    assert fields["rope_parameters"] == {"rope_theta": fields["rope_theta"], "rope_type": "default"}
    assert fields["rope_scaling"] is None and fields["max_position_embeddings"] == 2048
    assert (fields["hidden_act"], fields["attention_bias"], fields["mlp_bias"]) == ("silu", False, False)
    assert IM_END_ID in fields["eos_token_id"]
    # transformers 4.x and 5.x read the same shape, rope base and dtype back (no weights built).
    hf_cfg = transformers.LlamaConfig.from_dict(fields)
    rope_theta = getattr(hf_cfg, "rope_theta", None) or hf_cfg.rope_parameters["rope_theta"]  # 4.x or 5.x
    shape = (hf_cfg.head_dim, hf_cfg.num_key_value_heads, hf_cfg.vocab_size, rope_theta, hf_cfg.dtype)
    assert shape == (
        config.head_dim,
        config.num_key_value_heads,
        config.vocab_size,
        config.rope_theta,
        torch.bfloat16,
    )
