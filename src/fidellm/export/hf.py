"""Export to, and load from, a Hugging Face Llama directory (no remote code, transformers 4.x and 5.x).

The directory follows shared/design/ecosystem.md: `model.safetensors` with HF Llama names (no
`lm_head.weight` when tied, metadata {"format": "pt"}), `config.json` with both `rope_theta` and
`rope_parameters` and both `torch_dtype` and `dtype`, `generation_config.json`, and the tokenizer files
written by `BPETokenizer.save` with the model's context as `model_max_length` and the project's chat
template (`fidellm.chat.template.CHAT_TEMPLATE`) inline in tokenizer_config.json.
Our parameter names are HF's, so export is a dtype cast and a copy; loading reads safetensors only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fidellm.chat.template import CHAT_TEMPLATE
from fidellm.errors import FidelError
from fidellm.jsonfile import read_json_object
from fidellm.models.llama import LlamaConfig, LlamaForCausalLM
from fidellm.paths import make_output_dir
from fidellm.tokenizer.base import read_meta
from fidellm.tokenizer.bpe import BPETokenizer

WEIGHTS_FILE = "model.safetensors"
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
TIED_KEY = "lm_head.weight"


def hf_config(config: LlamaConfig, dtype: str) -> dict[str, Any]:
    """config.json contents; `dtype` is the dtype the weights are stored in."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        # transformers 5 reads rope_parameters; 4.x reads rope_theta (and silently defaults to 10000).
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_theta": config.rope_theta, "rope_type": "default"},
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "initializer_range": 0.02,
        "use_cache": True,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": list(config.eos_token_id),
        "pad_token_id": config.pad_token_id,
        "torch_dtype": dtype,
        "dtype": dtype,
    }


def generation_config(config: LlamaConfig) -> dict[str, Any]:
    """generation_config.json: the special ids generation stops at and pads with."""
    return {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": list(config.eos_token_id),
        "pad_token_id": config.pad_token_id,
    }


def _write_json(path: Path, content: dict[str, Any]) -> None:
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def cast_weight(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` on the CPU in `dtype`; a value beyond float16's range (±65504) is refused by name
    rather than stored as inf (bfloat16 has float32's range)."""
    if dtype == torch.float16 and tensor.numel() and tensor.detach().abs().max() > torch.finfo(dtype).max:
        raise FidelError(
            f"weight {name} has values beyond the float16 range (±{torch.finfo(dtype).max:g}); export"
            " --dtype bfloat16 or float32"
        )
    return tensor.detach().to("cpu", dtype)


def load_bpe(tokenizer_dir: str | os.PathLike, target: str) -> BPETokenizer:
    """The BPE tokenizer an HF or GGUF export writes; a byte tokenizer (a Llama trained on bytes) is
    refused by name rather than as a missing tokenizer.json."""
    kind = read_meta(Path(tokenizer_dir)).get("kind")
    if kind != "bpe":
        raise FidelError(
            f"{tokenizer_dir}: {target} export writes a BPE tokenizer, but this is a {kind} tokenizer"
        )
    return BPETokenizer.load(tokenizer_dir)


def export_hf(
    model: LlamaForCausalLM,
    config: LlamaConfig,
    tokenizer_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: str = "bfloat16",
) -> Path:
    """Write a Hugging Face Llama directory for `model` and the tokenizer saved in `tokenizer_dir`.

    Weights are cast to `dtype` ("bfloat16" for serving, "float32" for exact comparisons); the configs
    state that dtype. Returns `out_dir`.
    """
    if dtype not in DTYPES:
        raise FidelError(f"export dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    tokenizer = load_bpe(tokenizer_dir, "HF")
    if tokenizer.vocab_size > config.vocab_size:
        raise FidelError(
            f"tokenizer in {tokenizer_dir} has {tokenizer.vocab_size} ids, more than the model's"
            f" vocab_size {config.vocab_size}"
        )
    state = model.state_dict()
    tied = config.tie_word_embeddings
    if tied and state[TIED_KEY].data_ptr() != state["model.embed_tokens.weight"].data_ptr():
        raise FidelError("config says tie_word_embeddings but the model's lm_head is not the embedding")
    tensors = {
        name: cast_weight(name, tensor, DTYPES[dtype]).contiguous()
        for name, tensor in state.items()
        if not (tied and name == TIED_KEY)
    }
    out = Path(out_dir)
    make_output_dir(out)  # after every check: a refused export leaves no directory behind
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / WEIGHTS_FILE).chmod(0o644)  # safetensors writes 0600; an export is read by servers and other users
    _write_json(out / "config.json", hf_config(config, dtype))
    _write_json(out / "generation_config.json", generation_config(config))
    tokenizer.save(out, model_max_length=config.max_position_embeddings, chat_template=CHAT_TEMPLATE)
    return out


SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _special_ids(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """The special token ids config.json sets, checked; null (a Llama checkpoint's usual pad_token_id)
    is not set, so our default applies as for a missing field. eos may be one id or a list."""
    found: dict[str, Any] = {}
    for name in SPECIAL_IDS:
        value = data.get(name)
        if value is None:
            continue
        ids = value if name == "eos_token_id" and isinstance(value, list) else [value]
        if not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise FidelError(f"{path}: {name} must be a token id (an integer), got {value!r}")
        found[name] = tuple(ids) if name == "eos_token_id" else value
    return found


def _config_from_hf(data: dict[str, Any], path: Path) -> LlamaConfig:
    """Our config from a Llama config.json, refusing features our model does not implement; `data` has
    tie_word_embeddings (`load_hf_dir` fills in an absent one from the weights)."""
    if data.get("model_type") != "llama":
        raise FidelError(f"{path}: model_type is {data.get('model_type')!r}, expected 'llama'")
    checks = {
        "hidden_act": (data.get("hidden_act", "silu"), "silu"),
        "attention_bias": (data.get("attention_bias", False), False),
        "mlp_bias": (data.get("mlp_bias", False), False),
    }
    for field, (found, expected) in checks.items():
        if found != expected:
            raise FidelError(f"{path}: {field} is {found!r}; only {expected!r} is supported")
    for key in ("rope_parameters", "rope_scaling"):  # transformers 5 reads the first, 4.x the second
        rope = data.get(key) or {}
        if not isinstance(rope, dict):
            raise FidelError(f"{path}: {key} must be an object or null, got {rope!r}")
        kind = rope.get("rope_type", rope.get("type", "default"))  # "type": older 4.x files
        if kind != "default":
            raise FidelError(f"{path}: {key} rope_type {kind!r} is not supported, only 'default'")
    rope = data.get("rope_parameters") or data.get("rope_scaling") or {}
    rope_theta = data.get("rope_theta", rope.get("rope_theta"))
    if rope_theta is None:
        raise FidelError(f"{path}: neither rope_theta nor rope_parameters.rope_theta is set")
    if isinstance(rope_theta, bool) or not isinstance(rope_theta, (int, float)):
        raise FidelError(f"{path}: rope_theta must be a number, got {rope_theta!r}")
    eps = data.get("rms_norm_eps", 1e-5)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise FidelError(f"{path}: rms_norm_eps must be a positive number, got {eps!r}")
    for name in ("vocab_size", "intermediate_size", "num_hidden_layers"):
        if name not in data:
            raise FidelError(f"{path}: missing field {name!r}")
    for name in ("hidden_size", "num_attention_heads"):  # head_dim is derived from them below
        if not isinstance(data.get(name), int) or isinstance(data[name], bool) or data[name] < 1:
            raise FidelError(f"{path}: {name} must be a positive integer, got {data.get(name)!r}")
    special = _special_ids(data, path)
    try:
        return LlamaConfig.from_dict(
            {
                **{key: value for key, value in data.items() if key not in SPECIAL_IDS},
                **special,
                "num_key_value_heads": data.get("num_key_value_heads", data["num_attention_heads"]),
                "head_dim": data.get("head_dim") or data["hidden_size"] // data["num_attention_heads"],
                "rope_theta": float(rope_theta),
                "tie_word_embeddings": data["tie_word_embeddings"],
                "dropout": data.get("attention_dropout", 0.0),
            }
        )
    except KeyError as error:
        raise FidelError(f"{path}: missing field {error}") from error
    except FidelError as error:  # LlamaConfig's own checks name the field
        raise FidelError(f"{path}: {error}") from None


def load_hf_dir(
    directory: str | os.PathLike, dtype: torch.dtype = torch.float32
) -> tuple[LlamaForCausalLM, LlamaConfig]:
    """Load a Llama HF directory (config.json + model.safetensors) into our class, in `dtype`, eval mode."""
    directory = Path(directory)
    config_path, weights_path = directory / "config.json", directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FidelError(f"{path} does not exist")
    data = read_json_object(config_path)
    try:
        with safe_open(str(weights_path), framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
    except Exception as error:  # safetensors raises its own error types for malformed files
        raise FidelError(f"{weights_path}: cannot read safetensors: {error}") from error
    if "tie_word_embeddings" not in data:  # transformers reads absent as untied (LlamaConfig's default);
        data = {**data, "tie_word_embeddings": TIED_KEY not in tensors}  # without lm_head it can only be tied
    config = _config_from_hf(data, config_path)
    model = LlamaForCausalLM(config)
    expected = model.state_dict()
    if config.tie_word_embeddings and TIED_KEY in tensors:
        if not torch.equal(tensors[TIED_KEY], tensors.get("model.embed_tokens.weight", tensors[TIED_KEY])):
            raise FidelError(f"{weights_path}: tie_word_embeddings is set but lm_head.weight differs")
        del tensors[TIED_KEY]
    wanted = {name for name in expected if not (config.tie_word_embeddings and name == TIED_KEY)}
    missing, unexpected = sorted(wanted - tensors.keys()), sorted(tensors.keys() - wanted)
    if missing or unexpected:
        raise FidelError(
            f"{weights_path}: missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]}"
        )
    for name in wanted:
        if tensors[name].shape != expected[name].shape:
            raise FidelError(
                f"{weights_path}: {name} has shape {tuple(tensors[name].shape)},"
                f" config.json implies {tuple(expected[name].shape)}"
            )
    if config.tie_word_embeddings:
        tensors[TIED_KEY] = tensors["model.embed_tokens.weight"]
    model.load_state_dict(tensors, strict=True)
    return model.to(dtype).eval(), config
