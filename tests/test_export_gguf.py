"""GGUF export: the file read back with gguf's reader, the Q/K permutation against llama.cpp's RoPE, the CLI;
and, under the `llamacpp` marker (`make test-gguf`), llama.cpp itself tokenizing and scoring FLORES text."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from fidellm.chat.template import CHAT_TEMPLATE
from fidellm.cli import cli
from fidellm.errors import FidelError
from fidellm.export.cli import GGUF_TYPES
from fidellm.export.gguf import QTYPES, export_gguf, gguf_tensor_name, permute_qk
from fidellm.export.hf import export_hf
from fidellm.models.blocks import RotaryEmbedding, apply_rotary
from fidellm.models.llama import LlamaConfig, LlamaForCausalLM
from fidellm.paths import resolve_data_dir
from fidellm.tokenizer.bpe import GGUF_PRE, BPETokenizer, train_bpe
from fixtures.models import gqa_config, random_llama

TOKENIZER_VOCAB = 768
MODEL_VOCAB = 832
"""Larger than the tokenizer, so the file carries unused [PADn] entries as a padded model does."""
FFN_UNALIGNED = 72
"""An FFN width that is not a multiple of 32: ffn_down's rows cannot be Q8_0 blocks and fall back to f16."""
T = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small BPE trained on the real FLORES-200 Amharic dev set, saved as the tokenizer stage does."""
    lines = (resolve_data_dir() / "flores200" / "amh_Ethi.dev").read_text(encoding="utf-8").splitlines()
    directory = tmp_path_factory.mktemp("tokenizer")
    train_bpe(lines, TOKENIZER_VOCAB, show_progress=False).save(directory)
    return directory


def random_model(tie: bool = True, seed: int = 0, **overrides: Any) -> tuple[LlamaForCausalLM, LlamaConfig]:
    """A tiny GQA model (4 query heads of 16 over 2 KV heads) with random weights and norm gains."""
    shape = {
        "vocab_size": MODEL_VOCAB,
        "num_hidden_layers": 2,
        "max_position_embeddings": 128,
        "rope_theta": 500.0,
    }
    config = gqa_config(**{**shape, "tie_word_embeddings": tie, **overrides})
    return random_llama(config, seed), config


def unpermute_qk(weights: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of `permute_qk`: adjacent-pair rows back to rotate_half rows."""
    rows = weights.shape[0]
    return (
        weights.reshape(n_head, rows // n_head // 2, 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def read(path: Path) -> tuple[dict[str, Any], dict[str, gguf.ReaderTensor]]:
    """(metadata key -> value, tensor name -> tensor) of a GGUF file."""
    reader = gguf.GGUFReader(path)
    return {key: field.contents() for key, field in reader.fields.items()}, {
        t.name: t for t in reader.tensors
    }


def as_float(tensor: gguf.ReaderTensor) -> np.ndarray:
    """A tensor's values in float32, in our (rows, columns) layout."""
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(
        tuple(reversed(tensor.shape.tolist()))
    )


def our_tensors(model: LlamaForCausalLM, config: LlamaConfig) -> dict[str, np.ndarray]:
    """Our parameters under llama.cpp's names, Q and K un-permuted: what a correct file must hold."""
    names = {
        "model.embed_tokens.weight": "token_embd",
        "model.norm.weight": "output_norm",
        "lm_head.weight": "output",
    }
    layer = {
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    }  # fmt: skip
    out = {}
    for name, tensor in model.state_dict().items():
        match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", name)
        key = f"blk.{match[1]}.{layer[match[2]]}" if match else names[name]
        out[f"{key}.weight"] = tensor.detach().float().numpy()
    if config.tie_word_embeddings:
        del out["output.weight"]
    return out


def stored(tensors: dict[str, gguf.ReaderTensor], config: LlamaConfig) -> dict[str, np.ndarray]:
    """The file's tensors as float32 with Q and K un-permuted."""
    out = {name: as_float(tensor) for name, tensor in tensors.items()}
    for name in out:
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = config.num_attention_heads if "attn_q" in name else config.num_key_value_heads
            out[name] = unpermute_qk(out[name], heads)
    return out


def test_metadata_follows_llama_cpp(tokenizer_dir: Path, tmp_path: Path) -> None:
    model, config = random_model()
    path = export_gguf(model, config, tokenizer_dir, tmp_path / "m.gguf", qtype="f16", name="tiny")
    meta, _ = read(path)
    expected = {
        "general.architecture": "llama",
        "general.type": "model",
        "general.name": "tiny",
        "general.file_type": int(gguf.LlamaFileType.MOSTLY_F16),
        "general.quantization_version": gguf.GGML_QUANT_VERSION,
        "llama.context_length": 128,
        "llama.embedding_length": 64,
        "llama.block_count": 2,
        "llama.feed_forward_length": 160,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.attention.key_length": 16,
        "llama.attention.value_length": 16,
        "llama.rope.dimension_count": 16,
        "llama.rope.freq_base": 500.0,
        "llama.vocab_size": MODEL_VOCAB,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": GGUF_PRE,
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 0,
        "tokenizer.ggml.padding_token_id": 1,
        "tokenizer.ggml.eot_token_id": 3,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
        "tokenizer.chat_template": CHAT_TEMPLATE,
    }
    assert {key: meta.get(key) for key in expected} == expected
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert not (tmp_path / "m.gguf.partial").exists()


def test_vocabulary_is_the_tokenizers(tokenizer_dir: Path, tmp_path: Path) -> None:
    model, config = random_model()
    meta, _ = read(export_gguf(model, config, tokenizer_dir, tmp_path / "m.gguf"))
    tokenizer = BPETokenizer.load(tokenizer_dir)
    vocab = tokenizer.hf.get_vocab(with_added_tokens=True)
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == MODEL_VOCAB
    assert tokens[: len(vocab)] == sorted(vocab, key=vocab.__getitem__)
    assert tokens[len(vocab) :] == [f"[PAD{i}]" for i in range(len(vocab), MODEL_VOCAB)]
    types = meta["tokenizer.ggml.token_type"]
    tt = gguf.TokenType
    assert types[:8] == [tt.CONTROL] * 4 + [tt.USER_DEFINED] * 4
    assert set(types[8 : len(vocab)]) == {tt.NORMAL} and set(types[len(vocab) :]) == {tt.UNUSED}
    merges = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]["merges"]
    assert meta["tokenizer.ggml.merges"] == [" ".join(pair) for pair in merges] and len(merges) > 400


@pytest.mark.parametrize("tie", [True, False])
def test_f32_tensors_are_ours_under_llama_cpp_names(tie: bool, tokenizer_dir: Path, tmp_path: Path) -> None:
    model, config = random_model(tie)
    _, tensors = read(export_gguf(model, config, tokenizer_dir, tmp_path / "m.gguf", qtype="f32"))
    ours = our_tensors(model, config)
    assert set(tensors) == set(ours)
    assert ("output.weight" in tensors) is not tie
    assert {tensor.tensor_type for tensor in tensors.values()} == {T.F32}
    theirs = stored(tensors, config)
    for name, values in ours.items():
        assert np.array_equal(theirs[name], values), name
    # Names as gguf's own HF -> GGUF table (the one convert_hf_to_gguf uses) maps them.
    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    mapped = {table.get_name(name, try_suffixes=(".weight",)) for name in model.state_dict()}
    assert mapped - set(tensors) == ({"output.weight"} if tie else set())


def test_qk_permutation_turns_rotate_half_rope_into_llama_cpp_rope() -> None:
    """Attention scores with our RoPE (halves) on our weights equal those with ggml's "normal" RoPE
    (adjacent pairs, theta_i = pos * base^(-2i/d)) on the permuted weights, for every head of a GQA model."""
    model, config = random_model()
    attention, d = model.model.layers[0].self_attn, config.head_dim
    torch.manual_seed(3)
    x = torch.randn(12, config.hidden_size)
    positions = torch.arange(12)
    cos, sin = RotaryEmbedding(d, config.rope_theta)(positions, torch.float32)

    def heads(weight: np.ndarray | torch.Tensor, n: int) -> torch.Tensor:
        return (x @ torch.as_tensor(weight).T).reshape(12, n, d).transpose(0, 1)  # (heads, seq, d)

    def ggml_rope(v: torch.Tensor) -> torch.Tensor:
        theta = positions[:, None] * config.rope_theta ** (-torch.arange(0, d, 2) / d)
        even, odd = v[..., 0::2], v[..., 1::2]
        out = torch.stack(
            (even * theta.cos() - odd * theta.sin(), even * theta.sin() + odd * theta.cos()), -1
        )
        return out.flatten(-2)

    n_q, n_kv = config.num_attention_heads, config.num_key_value_heads
    wq, wk = attention.q_proj.weight.detach(), attention.k_proj.weight.detach()
    q, k = apply_rotary(heads(wq, n_q), cos, sin), apply_rotary(heads(wk, n_kv), cos, sin)
    q2 = ggml_rope(heads(permute_qk(wq.numpy(), n_q), n_q))
    k2 = ggml_rope(heads(permute_qk(wk.numpy(), n_kv), n_kv))
    group = n_q // n_kv
    ours = q @ k.repeat_interleave(group, 0).transpose(1, 2)
    theirs = q2 @ k2.repeat_interleave(group, 0).transpose(1, 2)
    assert torch.allclose(ours, theirs, atol=1e-5)
    unpermuted = q2 @ ggml_rope(heads(wk, n_kv)).repeat_interleave(group, 0).transpose(1, 2)
    assert not torch.allclose(ours, unpermuted, atol=1e-2)  # without the permutation the scores differ


def test_f16_and_q8_0_round_trip(tokenizer_dir: Path, tmp_path: Path) -> None:
    model, config = random_model(intermediate_size=FFN_UNALIGNED)
    ours = our_tensors(model, config)
    _, f16 = read(export_gguf(model, config, tokenizer_dir, tmp_path / "f16.gguf", qtype="f16"))
    _, q8 = read(export_gguf(model, config, tokenizer_dir, tmp_path / "q8.gguf", qtype="q8_0"))
    for name, values in stored(f16, config).items():
        expected = ours[name] if values.ndim == 1 else ours[name].astype(np.float16).astype(np.float32)
        assert f16[name].tensor_type == (T.F32 if values.ndim == 1 else T.F16), name
        assert np.array_equal(values, expected), name
    for name, values in stored(q8, config).items():
        if values.ndim == 1:
            assert q8[name].tensor_type == T.F32 and np.array_equal(values, ours[name]), name
        elif name.endswith("ffn_down.weight"):  # rows of 72 values are not whole blocks of 32
            assert q8[name].tensor_type == T.F16, name
        else:
            assert q8[name].tensor_type == T.Q8_0, name
            blocks = ours[name].reshape(-1, 32)
            step = np.abs(blocks).max(axis=1, keepdims=True) / 127  # one quantization step per block
            error = np.abs(values.reshape(-1, 32) - blocks)
            # Rounding costs half a step; storing the step in f16 (relative error 2^-11) up to 127·2^-11.
            assert (error <= (0.5 + 127 * 2**-11) * step).all(), name
            assert error.max() > 0 and q8[name].n_bytes == values.size // 32 * 34  # 32 int8 + an f16 step


LOW_BIT = {  # type: (bytes per block of 32, quantization levels, offset-and-scale blocks)
    "q5_1": (24, 31, True),
    "q5_0": (22, 16, False),
    "q4_1": (20, 15, True),
    "q4_0": (18, 8, False),
}


@pytest.mark.parametrize("qtype", sorted(LOW_BIT))
@pytest.mark.parametrize("tie", [True, False])
def test_low_bit_types_round_trip_with_the_output_matrices_in_q8_0(
    qtype: str, tie: bool, tokenizer_dir: Path, tmp_path: Path
) -> None:
    model, config = random_model(tie=tie, intermediate_size=FFN_UNALIGNED)
    ours = our_tensors(model, config)
    metadata, tensors = read(export_gguf(model, config, tokenizer_dir, tmp_path / "m.gguf", qtype=qtype))
    assert metadata["general.file_type"] == int(QTYPES[qtype][1])
    block_bytes, levels, offset = LOW_BIT[qtype]
    assert {"token_embd.weight", "output.weight"} & tensors.keys() == (
        {"token_embd.weight"} if tie else {"token_embd.weight", "output.weight"}
    )
    for name, values in stored(tensors, config).items():
        kind = tensors[name].tensor_type
        if values.ndim == 1:
            assert kind == T.F32 and np.array_equal(values, ours[name]), name
        elif name.endswith("ffn_down.weight"):  # rows of 72 values are not whole blocks of 32
            assert kind == T.F16, name
        elif name in ("token_embd.weight", "output.weight"):
            assert kind == T.Q8_0, name
        else:
            assert kind == T[qtype.upper()] and tensors[name].n_bytes == values.size // 32 * block_bytes, name
            blocks = ours[name].reshape(-1, 32)
            if offset:  # min + d·q, d = (max − min) / levels: rounding costs half a step
                step = (blocks.max(axis=1, keepdims=True) - blocks.min(axis=1, keepdims=True)) / levels
                bound = 0.5
            else:  # d·q with d = ±max|x| / levels: the far end is clipped by up to one step
                step = np.abs(blocks).max(axis=1, keepdims=True) / levels
                bound = 1.0
            error = np.abs(values.reshape(-1, 32) - blocks)
            assert (error <= (bound + levels * 2**-10) * step).all(), name  # + the f16 scale's rounding
            assert error.max() > 0, name


def test_cli_offers_every_gguf_type() -> None:
    assert set(GGUF_TYPES) == set(QTYPES)


def test_cli_exports_an_hf_directory(tokenizer_dir: Path, tmp_path: Path) -> None:
    model, config = random_model()
    export_hf(model, config, tokenizer_dir, tmp_path / "amharic-tiny", dtype="float32")
    out = tmp_path / "out" / "model.gguf"
    result = CliRunner().invoke(
        cli, ["export", "gguf", str(tmp_path / "amharic-tiny"), str(out), "--type", "q8_0"]
    )
    assert result.exit_code == 0, result.output
    assert f"wrote {out} (q8_0, " in result.output and " MB, " in result.output
    meta, tensors = read(out)
    assert meta["general.name"] == "amharic-tiny"
    assert meta["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert tensors["blk.1.ffn_up.weight"].tensor_type == T.Q8_0
    result = CliRunner().invoke(
        cli, ["export", "gguf", str(tmp_path / "amharic-tiny"), str(out), "--type", "q4"]
    )
    assert result.exit_code == 2 and "'q4' is not one of" in result.output


def test_bad_inputs_are_clear_errors(tokenizer_dir: Path, tmp_path: Path) -> None:
    model, config = random_model()
    out = tmp_path / "m.gguf"
    with pytest.raises(FidelError, match="GGUF type 'int4'"):
        export_gguf(model, config, tokenizer_dir, out, qtype="int4")
    small_model, small = random_model(vocab_size=512)
    with pytest.raises(FidelError, match="768 ids, more than the model's vocab_size 512"):
        export_gguf(small_model, small, tokenizer_dir, out)
    with pytest.raises(
        FidelError, match="tie_word_embeddings=False but the model's lm_head is the embedding"
    ):
        export_gguf(
            model, LlamaConfig(**{**config.__dict__, "tie_word_embeddings": False}), tokenizer_dir, out
        )
    wide = LlamaConfig(**{**config.__dict__, "head_dim": 32})
    with pytest.raises(
        FidelError, match=r"q_proj.weight has shape \(64, 64\), its config implies \(128, 64\)"
    ):
        export_gguf(model, wide, tokenizer_dir, out)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = 1e6
    with pytest.raises(FidelError, match=r"blk.1.ffn_up.weight has values beyond the f16 range.*--type f32"):
        export_gguf(model, config, tokenizer_dir, out, qtype="f16")
    export_gguf(model, config, tokenizer_dir, out, qtype="f32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


# --- llama.cpp itself (llama-cpp-python builds from source: `make test-gguf`) ---------------------------

LOGIT_TOLERANCE_Q8 = {"random": 1e-1, "init": 2e-2}
LOGIT_TOLERANCE = {
    ("f32", "random"): 1e-5, ("f16", "random"): 5e-3, ("q8_0", "random"): LOGIT_TOLERANCE_Q8["random"],
    ("f32", "init"): 1e-5, ("f16", "init"): 5e-3, ("q8_0", "init"): LOGIT_TOLERANCE_Q8["init"],
    **{(q, w): LOGIT_TOLERANCE_Q8[w] for q in LOW_BIT for w in ("random", "init")},
}  # fmt: skip
"""Largest |llama.cpp logit - ours| allowed, relative to the largest |logit|. "random" weights (std 0.1,
random norm gains) amplify rounding far more than "init" ones (our initialisation, std 0.02); q8_0 differs
mostly because llama.cpp also rounds the activations to 8 bits in its Q8_0 matrix products. The 4- and
5-bit types are compared with our model holding the file's own (dequantized) weights, so the same 8-bit
rounding of activations is all that may differ and q8_0's bound holds."""


@pytest.fixture(scope="module")
def llama_cpp() -> Any:
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (`make test-gguf`)")


def load_llama(llama_cpp: Any, path: Path, **kwargs: Any) -> Any:
    """llama_cpp.Llama on `path`, with llama.cpp's weight repacking ("extra buffer types") off: on CPUs
    with AMX its repacked Q8_0 matrix product segfaults (ggml-org/llama.cpp#20824), whatever the file."""
    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def without_repacking() -> Any:
        params = defaults()
        params.use_extra_bufts = False
        return params

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(llama_cpp.llama_cpp, "llama_model_default_params", without_repacking)
        return llama_cpp.Llama(model_path=str(path), verbose=False, **kwargs)


def devtest_lines() -> list[str]:
    return (resolve_data_dir() / "flores200" / "amh_Ethi.devtest").read_text(encoding="utf-8").splitlines()


@pytest.mark.llamacpp
def test_llama_cpp_tokenizes_flores_like_us(llama_cpp: Any, tokenizer_dir: Path, tmp_path: Path) -> None:
    model, config = random_model()
    path = export_gguf(model, config, tokenizer_dir, tmp_path / "m.gguf", qtype="f32")
    llm = load_llama(llama_cpp, path, vocab_only=True)
    tokenizer = BPETokenizer.load(tokenizer_dir)
    lines = devtest_lines()
    assert sum(bool(re.search(r"\d", line)) for line in lines) > 100  # digits (pre-tokenizer splits them)
    assert sum("።" in line and "፣" in line for line in lines) > 100  # Ethiopic punctuation
    mismatched = [
        line
        for line in lines
        if llm.tokenize(line.encode(), add_bos=True, special=False) != tokenizer.encode(line, True)
    ]
    same = len(lines) - len(mismatched)
    print(f"\nllama.cpp {llama_cpp.__version__}: token ids identical on {same}/{len(lines)} FLORES lines")
    assert mismatched == []
    # Ethiopic numerals after runs of spaces: llama.cpp's "gpt-2" pre-tokenizer (no digit split) differs here.
    for text in ["ቁጥር፦  ፲፪  ፳", "በ2015  ዓ.ም. 12  34", "ሰላም   2024\n\n  7"]:
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == tokenizer.encode(text, True), text
    for line in lines[:50]:
        assert llm.detokenize(tokenizer.encode(line)).decode() == line
    chat = '<|im_start|>user\nሰላም 2024<|im_end|>\n<tool_call>{"name": "f"}</tool_call>'
    assert llm.tokenize(chat.encode(), add_bos=False, special=True) == tokenizer.encode(chat)
    assert (llm.token_bos(), llm.token_eos()) == (0, 0)
    assert llm.metadata["tokenizer.chat_template"] == CHAT_TEMPLATE


def with_file_weights(path: Path, config: LlamaConfig) -> LlamaForCausalLM:
    """Our model holding the weights as the GGUF file at `path` stores them (dequantized)."""
    model = LlamaForCausalLM(config).eval()
    values = stored(read(path)[1], config)
    names = {name: "token_embd.weight" if name == "lm_head.weight" and config.tie_word_embeddings
             else gguf_tensor_name(name) for name in model.state_dict()}  # fmt: skip
    model.load_state_dict({name: torch.tensor(values[key]) for name, key in names.items()})
    return model


@pytest.mark.llamacpp
@pytest.mark.parametrize("weights", ["random", "init"])
@pytest.mark.parametrize("qtype", ["f32", "f16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"])
def test_llama_cpp_logits_match_ours(
    qtype: str, weights: str, llama_cpp: Any, tokenizer_dir: Path, tmp_path: Path
) -> None:
    model, config = random_model(tie=qtype != "f16")  # f16 runs the untied head (output.weight)
    if weights == "init":
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
    path = export_gguf(model, config, tokenizer_dir, tmp_path / "m.gguf", qtype=qtype)
    if qtype in LOW_BIT:  # against the weights the file holds: what is left is llama.cpp's own arithmetic
        model = with_file_weights(path, config)
    f32_cache = {"type_k": int(gguf.GGMLQuantizationType.F32), "type_v": int(gguf.GGMLQuantizationType.F32)}
    llm = load_llama(llama_cpp, path, n_ctx=config.max_position_embeddings, logits_all=True, **f32_cache)
    tokenizer = BPETokenizer.load(tokenizer_dir)
    rows = [ids[:96] for ids in tokenizer.encode_batch(devtest_lines(), add_bos=True) if len(ids) >= 96][:4]
    worst, scale, agree, total = 0.0, 0.0, 0, 0
    for ids in rows:
        llm.reset()
        llm.eval(ids)
        theirs = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
        with torch.no_grad():
            ours = model(torch.tensor([ids])).logits[0].numpy()
        worst, scale = max(worst, float(np.abs(theirs - ours).max())), max(scale, float(np.abs(ours).max()))
        agree, total = agree + int((theirs.argmax(-1) == ours.argmax(-1)).sum()), total + len(ids)
    print(
        f"\nllama.cpp {llama_cpp.__version__} {qtype} ({weights} weights): max |Δlogit| {worst:.2e}"
        f" (largest |logit| {scale:.2f}) over {len(rows)}x{len(rows[0])} FLORES positions;"
        f" next-token argmax agrees at {agree}/{total}"
    )
    assert len(rows) == 4
    assert worst <= LOGIT_TOLERANCE[qtype, weights] * scale
    assert qtype != "f32" or agree == total
