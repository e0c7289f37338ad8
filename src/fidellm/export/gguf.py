"""Export to GGUF, the single-file format of llama.cpp (and llama-cpp-python, Ollama, LM Studio).

llama.cpp's own convert_hf_to_gguf.py refuses a newly trained BPE vocabulary, so this module writes the
file with the `gguf` package's GGUFWriter the way that script writes an HF Llama checkpoint
(shared/design/ecosystem.md, "GGUF"):
- arch "llama" hyperparameters (context, widths, heads, head_dim as key/value length and RoPE width,
  rope base, RMSNorm epsilon, vocabulary size, file type) and general metadata;
- tensors under llama.cpp's names (TENSOR_NAMES); Q and K rows permuted by `permute_qk`, because our
  RoPE rotates the two halves of a head (HF's rotate_half) while llama.cpp's "llama" graph rotates
  adjacent pairs; no `output.weight` when the head is tied to the embedding;
- types as the converter picks them: 1-D tensors and norms in f32 always, other weights in the
  requested type; a weight whose rows are not whole blocks (32 values) falls back to f16. The 4- and
  5-bit types (q5_1, q5_0, q4_1, q4_0, which llama.cpp's own quantizer writes) keep the output head and
  the embedding in Q8_0, as that quantizer keeps the output matrix at 6 bits or more;
- the tokenizer: model "gpt2" (byte-level BPE) with pre-tokenizer GGUF_PRE, the tokens in id order
  padded with unused "[PADn]" entries up to the model's vocabulary, token types, merges, the special
  ids and the ChatML + Hermes-tools chat template.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import numpy as np
import torch

from fidellm.chat.template import CHAT_TEMPLATE
from fidellm.errors import FidelError
from fidellm.export.hf import load_bpe
from fidellm.models.llama import LlamaConfig, LlamaForCausalLM
from fidellm.paths import make_output_dir
from fidellm.tokenizer.bpe import GGUF_PRE, BPETokenizer
from fidellm.tokenizer.special import IM_END_ID, RESERVED_TOKENS

ARCH = "llama"
QTYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q5_1": (gguf.GGMLQuantizationType.Q5_1, gguf.LlamaFileType.MOSTLY_Q5_1),
    "q5_0": (gguf.GGMLQuantizationType.Q5_0, gguf.LlamaFileType.MOSTLY_Q5_0),
    "q4_1": (gguf.GGMLQuantizationType.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1),
    "q4_0": (gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
"""`--type` choices: the type of the 2-D weights and the file type GGUF records for it."""

OUTPUT_MATRICES = ("token_embd.weight", "output.weight")
"""Under the 4- and 5-bit types these stay Q8_0: the output head (the embedding, when tied) is what
llama.cpp's own quantizer keeps at 6 bits or more (Q6_K, which the gguf package cannot write)."""
LOW_BIT = {QTYPES[name][0] for name in ("q5_1", "q5_0", "q4_1", "q4_0")}

TENSOR_NAMES: dict[str, str] = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_NAMES: dict[str, str] = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
"""HF Llama name (after `model.layers.N.`) -> llama.cpp name (after `blk.N.`), as convert_hf_to_gguf maps."""

F16_MAX = float(np.finfo(np.float16).max)


def gguf_tensor_name(name: str) -> str:
    """llama.cpp's name for one of our (HF Llama) parameter names."""
    if name in TENSOR_NAMES:
        return TENSOR_NAMES[name]
    parts = name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in LAYER_NAMES:
        return f"blk.{parts[2]}.{LAYER_NAMES[parts[3]]}"
    raise FidelError(f"parameter {name!r} has no GGUF name: the model is not a plain Llama")


def permute_qk(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder each head's rows from rotate_half layout (pairs i, i + d/2) to adjacent pairs (2i, 2i + 1).

    Exactly llama.cpp's `LlamaModel.permute` (convert_hf_to_gguf.py), with `n_head` the number of heads
    of this projection (query heads for Q, KV heads for K).
    """
    rows = weights.shape[0]
    return (
        weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _check_shapes(state: dict[str, torch.Tensor], config: LlamaConfig) -> None:
    """Every tensor must have the shape `config` gives it: llama.cpp builds its graph from the metadata."""
    with torch.device("meta"):
        expected = LlamaForCausalLM(config).state_dict()
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise FidelError(
            f"model does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise FidelError(
                f"model tensor {name} has shape {tuple(tensor.shape)}, its config implies"
                f" {tuple(expected[name].shape)}; llama.cpp could not run it"
            )


def _vocab(
    tokenizer: BPETokenizer, vocab_size: int, tokenizer_dir: str | os.PathLike
) -> tuple[list[str], list[int]]:
    """Tokens in id order padded with "[PADn]" to `vocab_size`, and their llama.cpp token types."""
    by_id = {index: token for token, index in tokenizer.hf.get_vocab(with_added_tokens=True).items()}
    if sorted(by_id) != list(range(len(by_id))):
        raise FidelError(f"tokenizer in {tokenizer_dir}: token ids are not contiguous from 0")
    if len(by_id) > vocab_size:
        raise FidelError(
            f"tokenizer in {tokenizer_dir} has {len(by_id)} ids, more than the model's"
            f" vocab_size {vocab_size}"
        )
    tokens = [by_id[index] for index in range(len(by_id))]
    types = [int(gguf.TokenType.NORMAL)] * len(tokens)
    for reserved in RESERVED_TOKENS:  # control tokens are hidden in output; tool tags stay plain text
        types[reserved.id] = int(gguf.TokenType.CONTROL if reserved.special else gguf.TokenType.USER_DEFINED)
    pads = [f"[PAD{index}]" for index in range(len(tokens), vocab_size)]
    if set(pads) & set(tokens):
        raise FidelError(f"tokenizer in {tokenizer_dir} has a token named like a padding entry [PADn]")
    return tokens + pads, types + [int(gguf.TokenType.UNUSED)] * len(pads)


def _merges(tokenizer: BPETokenizer) -> list[str]:
    """The BPE merges as "left right" strings (tokenizer.json stores pairs or, in old files, strings)."""
    merges = json.loads(tokenizer.hf.to_str())["model"]["merges"]
    return [merge if isinstance(merge, str) else " ".join(merge) for merge in merges]


def _write_hparams(writer: gguf.GGUFWriter, config: LlamaConfig, file_type: gguf.LlamaFileType) -> None:
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_tokenizer(
    writer: gguf.GGUFWriter, tokenizer: BPETokenizer, tokens: list[str], types: list[int]
) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(GGUF_PRE)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(_merges(tokenizer))
    writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_pad_token_id(tokenizer.pad_id)
    writer.add_eot_token_id(IM_END_ID)  # chat turns end at <|im_end|>; llama.cpp stops at eos and eot
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)


def _tensor_data(
    gguf_name: str, array: np.ndarray, qtype: gguf.GGMLQuantizationType
) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """The stored bytes and type of one tensor: f32 for 1-D tensors and norms, Q8_0 for the output
    matrices under a 4- or 5-bit type, else `qtype` (a quantized type falls back to f16 for rows that are
    not whole blocks of 32, as the converter does)."""
    if array.ndim <= 1 or gguf_name.endswith("_norm.weight"):
        qtype = gguf.GGMLQuantizationType.F32
    elif qtype in LOW_BIT and gguf_name in OUTPUT_MATRICES:
        qtype = gguf.GGMLQuantizationType.Q8_0
    if qtype == gguf.GGMLQuantizationType.F16 and np.abs(array).max() > F16_MAX:
        raise FidelError(
            f"tensor {gguf_name} has values beyond the f16 range (±{F16_MAX:g}); export --type f32"
        )
    try:
        return gguf.quants.quantize(array, qtype), qtype
    except gguf.QuantError:
        return _tensor_data(gguf_name, array, gguf.GGMLQuantizationType.F16)


def _gguf_tensors(
    state: dict[str, torch.Tensor], config: LlamaConfig, qtype: gguf.GGMLQuantizationType
) -> list[tuple[str, np.ndarray, gguf.GGMLQuantizationType]]:
    """(llama.cpp name, stored data, type) of every tensor, Q and K permuted; a tied lm_head left out."""
    heads = {
        "self_attn.q_proj.weight": config.num_attention_heads,
        "self_attn.k_proj.weight": config.num_key_value_heads,
    }
    tensors = []
    for hf_name, tensor in state.items():
        if config.tie_word_embeddings and hf_name == "lm_head.weight":
            continue
        array = tensor.detach().to("cpu", torch.float32).numpy()
        suffix = hf_name.split(".", 3)[-1]
        if suffix in heads:
            array = permute_qk(array, heads[suffix])
        gguf_name = gguf_tensor_name(hf_name)
        tensors.append((gguf_name, *_tensor_data(gguf_name, array, qtype)))
    return tensors


def export_gguf(
    model: LlamaForCausalLM,
    config: LlamaConfig,
    tokenizer_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    qtype: str = "f16",
    name: str = "fidel-lm",
) -> Path:
    """Write `model` and the tokenizer saved in `tokenizer_dir` as one GGUF file for llama.cpp.

    `qtype` (a key of QTYPES) is the type of the weight matrices; `name` goes into
    general.name. The file appears only when complete (written beside it, then renamed). Returns it.
    """
    if qtype not in QTYPES:
        raise FidelError(f"GGUF type {qtype!r} is not one of {', '.join(QTYPES)}")
    tensor_type, file_type = QTYPES[qtype]
    tokenizer = load_bpe(tokenizer_dir, "GGUF")
    tokens, types = _vocab(tokenizer, config.vocab_size, tokenizer_dir)
    state = model.state_dict()
    _check_shapes(state, config)
    tied = config.tie_word_embeddings
    if tied != (state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()):
        actual = "is not" if tied else "is"
        raise FidelError(
            f"config says tie_word_embeddings={tied} but the model's lm_head {actual} the embedding"
        )

    tensors = _gguf_tensors(state, config, tensor_type)  # refusals (f16 range) before any output

    out = Path(out_path)
    make_output_dir(out.parent)
    partial = out.with_name(out.name + ".partial")
    writer = gguf.GGUFWriter(partial, ARCH)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    _write_hparams(writer, config, file_type)
    _write_tokenizer(writer, tokenizer, tokens, types)
    for gguf_name, data, stored_type in tensors:
        writer.add_tensor(gguf_name, data, raw_dtype=stored_type)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    partial.replace(out)
    return out
