"""One place that knows every architecture: config from a preset, model from a config, and the blocks
that activation checkpointing and FSDP2 wrap. Training, loading and evaluation go through here, so a
new architecture is one more entry, not a change in each stage.

Architectures: "llama" (BPE tokens, fidellm.models.llama) and "hnet" (bytes, fidellm.models.hnet).
A saved model config carries its "arch" (configs saved before H-Net existed have none: llama).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from fidellm.errors import FidelError
from fidellm.models.hnet import HNetConfig, HNetForCausalLM
from fidellm.models.hnet import preset as hnet_preset
from fidellm.models.hnet.layers import Block as HNetBlock
from fidellm.models.llama import LlamaConfig, LlamaForCausalLM
from fidellm.models.llama import preset as llama_preset
from fidellm.tokenizer.special import BYTE_BOS_ID, BYTE_EOS_ID

ARCHS = ("llama", "hnet")
BYTE_VOCAB = 256
"""The byte tokenizer's ids; no BPE is this small."""
ModelConfig = LlamaConfig | HNetConfig


def preset_config(
    arch: str, name: str, vocab_size: int, max_positions: int, overrides: dict[str, Any]
) -> ModelConfig:
    """The named preset of `arch` with `overrides` (config field -> value) applied."""
    if arch == "llama":
        base: ModelConfig = llama_preset(name, vocab_size, max_position_embeddings=max_positions)
        if vocab_size <= BYTE_VOCAB:  # the byte tokenizer (a BPE has >= 512 ids): its own special ids
            base = dataclasses.replace(
                base,
                bos_token_id=BYTE_BOS_ID,
                eos_token_id=(BYTE_BOS_ID, BYTE_EOS_ID),
                pad_token_id=BYTE_EOS_ID,
            )
        fields = {f.name for f in dataclasses.fields(LlamaConfig)}
    elif arch == "hnet":
        if vocab_size > BYTE_VOCAB:
            raise FidelError(
                f"arch hnet reads bytes: the run's tokenizer has {vocab_size} ids, not a byte tokenizer"
                " (train one with `fidellm tokenizer train RUN --kind bytes`)"
            )
        base = hnet_preset(name, max_position_embeddings=max_positions)
        fields = {f.name for f in dataclasses.fields(HNetConfig)}
    else:
        raise FidelError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    unknown = set(overrides) - fields
    if unknown:
        raise FidelError(f"train config: unknown model fields {sorted(unknown)} for arch {arch}")
    return type(base).from_dict({**config_to_dict(base), **overrides})


def config_to_dict(config: ModelConfig) -> dict[str, Any]:
    """The config as saved in checkpoints (JSON-able), with its "arch"."""
    data = config.to_dict() if isinstance(config, HNetConfig) else dataclasses.asdict(config)
    return {**data, "arch": arch_of(config)}


def config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """Inverse of `config_to_dict` (a dict without "arch" is a Llama config). A field of the wrong type
    (a string for a number, a number for a list) is a FidelError, not the TypeError or ValueError
    the config's own checks would hit."""
    values = {k: v for k, v in data.items() if k != "arch"}
    arch = data.get("arch", "llama")
    if arch not in ARCHS:
        raise FidelError(f"model config names unknown arch {arch!r}; known: {', '.join(ARCHS)}")
    try:
        return LlamaConfig.from_dict(values) if arch == "llama" else HNetConfig.from_dict(values)
    except (TypeError, ValueError) as error:
        raise FidelError(f"model config ({arch}): a field has the wrong type: {error}") from None


def arch_of(config: ModelConfig) -> str:
    return "hnet" if isinstance(config, HNetConfig) else "llama"


def build_model(config: ModelConfig) -> nn.Module:
    """A freshly initialised model of `config`'s architecture."""
    return HNetForCausalLM(config) if isinstance(config, HNetConfig) else LlamaForCausalLM(config)


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The residual blocks of `model`: the units activation checkpointing recomputes and FSDP2 shards."""
    if isinstance(model, LlamaForCausalLM):
        return list(model.model.layers)
    return [module for module in model.modules() if isinstance(module, HNetBlock)]
