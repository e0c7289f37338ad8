"""QLoRA's 4-bit base (Dettmers et al. 2023) through bitsandbytes, and the way back to plain weights.

`quantize_linear_layers` replaces the architecture's projection layers (the attention, Mamba-2 mixer
and MLP Linear layers, `fidellm.sft.lora.DEFAULT_TARGETS`) by frozen bitsandbytes `Linear4bit` layers:
NF4 with double quantization of the block scales, computing in bf16 on CUDA and fp32 elsewhere. The LM
head (tied to the embeddings) and H-Net's fp32 skip projections and routers keep full precision (they
are small, and H-Net reads their weights directly). peft then wraps the targets with LoRA layers that
run the 4-bit base and add the full-precision adapters. Quantizing happens when the layer is moved to
the model's device, so it runs where the model lives (bitsandbytes >= 0.48 also quantizes on CPU,
which the tests use; CUDA is where it saves memory and time).

Merging (`merged_linear`) dequantizes a base weight, adds the adapter's delta (B·A·alpha/r) in fp32 and
returns a plain Linear: the merged model computes what the adapted 4-bit model computed, without
the rounding a re-quantization would add. `dequantize_linear_layers` does the same for the
non-target layers, so a merged QLoRA model is an ordinary model that saves and exports as usual.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch
from torch import nn

from fidellm.errors import FidelError


def _bnb() -> Any:
    try:
        import bitsandbytes
    except ImportError as error:
        raise FidelError(
            "QLoRA needs bitsandbytes: pip install 'fidel-lm[qlora]' (a CUDA GPU, or a CPU build >= 0.48)"
        ) from error
    return bitsandbytes


def quantize_linear_layers(model: nn.Module, names: Collection[str]) -> nn.Module:
    """Every nn.Linear of `model` whose own name is in `names` becomes a frozen NF4 `Linear4bit`
    (in place)."""
    bnb = _bnb()
    device = next(model.parameters()).device
    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or name.rpartition(".")[2] not in names:
            continue
        quantized = bnb.nn.Linear4bit(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            compute_dtype=compute,
            compress_statistics=True,
            quant_type="nf4",
            device="meta",
        )
        # bitsandbytes' packed CPU inference kernel repacks weights in place and needs out_features
        # divisible by 32 (H-Net's mixer projections are not): keep the portable path everywhere
        quantized.support_avx512bf16_for_cpu = False
        weight = module.weight.detach().float().cpu()
        quantized.weight = bnb.nn.Params4bit(
            weight, requires_grad=False, compress_statistics=True, quant_type="nf4"
        )
        if module.bias is not None:
            quantized.bias = nn.Parameter(module.bias.detach().float().cpu(), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, quantized.to(device))
    return model


def _dense_weight(layer: nn.Module) -> torch.Tensor:
    """The fp32 weight of a Linear or a (quantized) Linear4bit."""
    weight = layer.weight
    if getattr(weight, "quant_state", None) is not None:
        return _bnb().functional.dequantize_4bit(weight.data, weight.quant_state).float()
    return weight.detach().float()


def _plain(layer: nn.Module, weight: torch.Tensor) -> nn.Linear:
    """A plain Linear with `weight` and `layer`'s bias, on `layer`'s device."""
    out_features, in_features = weight.shape
    plain = nn.Linear(in_features, out_features, bias=layer.bias is not None, device=weight.device)
    with torch.no_grad():
        plain.weight.copy_(weight)
        if layer.bias is not None:
            plain.bias.copy_(layer.bias.detach().float())
    return plain


def merged_linear(lora_layer: nn.Module) -> nn.Linear:
    """A peft LoRA layer folded into one plain Linear: dequantized base weight + every active adapter's
    delta. A full-precision base is merged by peft itself (same result, its own dtype handling)."""
    base = lora_layer.get_base_layer()
    if getattr(base.weight, "quant_state", None) is None:
        lora_layer.merge()
        return base
    weight = _dense_weight(base)
    for adapter in lora_layer.active_adapters:
        weight = weight + lora_layer.get_delta_weight(adapter).float()
    return _plain(base, weight)


def dequantize_linear_layers(model: nn.Module) -> nn.Module:
    """Every remaining 4-bit Linear of `model` back to a plain fp32 Linear (in place)."""
    for name, module in list(model.named_modules()):
        if getattr(getattr(module, "weight", None), "quant_state", None) is None:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, _plain(module, _dense_weight(module)))
    return model


def quantized_keys(model: nn.Module) -> set[str]:
    """State-dict names of the 4-bit layers' weights and quantization states. Checkpoints leave them out:
    they are a deterministic function of the frozen base (bitsandbytes cannot load them back either),
    so a QLoRA run is restored by quantizing its base again and loading everything else."""
    prefixes = [
        f"{name}.weight"
        for name, module in model.named_modules()
        if getattr(getattr(module, "weight", None), "quant_state", None) is not None
    ]
    if not prefixes:
        return set()
    return {key for key in model.state_dict() if any(key.startswith(p) for p in prefixes)}
