"""Export to, and load from, an H-Net directory: the project's own format (no transformers class exists).

The directory holds `model.safetensors` (our parameter names, which are the reference implementation's;
metadata {"format": "pt"}; the fp32 skip path `residual_proj` stays fp32 in every dtype, as in the
reference's released files), `config.json` (`HNetConfig.to_dict()` plus "arch": "hnet",
"architectures": ["HNetForCausalLM"], "model_type": "fidellm-hnet" and the stored "dtype") and the byte
tokenizer's files, so `fidellm.models.load.load_model(OUT_DIR)` returns (model, OUT_DIR).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from fidellm.errors import FidelError
from fidellm.export.hf import cast_weight
from fidellm.jsonfile import read_json_object
from fidellm.models.factory import config_from_dict, config_to_dict
from fidellm.models.hnet import HNetConfig, HNetForCausalLM
from fidellm.paths import make_output_dir
from fidellm.tokenizer.base import read_meta
from fidellm.tokenizer.bytes import ByteTokenizer
from fidellm.train.checkpoint import read_weights

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
MODEL_TYPE = "fidellm-hnet"
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
FP32_PARAMETERS = ("residual_proj.weight", "residual_proj.bias")
"""Kept in fp32 whatever the export dtype: the skip path around each inner network runs in fp32."""


def hnet_config_json(config: HNetConfig, dtype: str) -> dict[str, Any]:
    """config.json contents; `dtype` is the dtype the weights (other than residual_proj) are stored in."""
    return {
        "architectures": ["HNetForCausalLM"],
        "model_type": MODEL_TYPE,
        **config_to_dict(config),
        "dtype": dtype,
    }


def export_hnet(
    model: HNetForCausalLM,
    tokenizer_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: str = "bfloat16",
) -> Path:
    """Write `model` and the byte tokenizer saved in `tokenizer_dir` as an H-Net directory; returns it.

    Weights are cast to `dtype` ("float32" for exact round trips), residual_proj excepted.
    """
    if not isinstance(model, HNetForCausalLM):
        raise FidelError(
            f"H-Net export needs an H-Net model; this is {type(model).__name__}"
            " (use `fidellm export hf MODEL OUT_DIR` or `fidellm export gguf MODEL OUT_FILE`)"
        )
    if dtype not in DTYPES:
        raise FidelError(f"export dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    kind = read_meta(Path(tokenizer_dir)).get("kind")
    if kind != ByteTokenizer.kind:
        raise FidelError(f"{tokenizer_dir}: an H-Net reads bytes, but this is a {kind} tokenizer")
    tokenizer = ByteTokenizer.load(tokenizer_dir)
    out = Path(out_dir)
    make_output_dir(out)  # after every check: a refused export leaves no directory behind
    weights = {
        name: cast_weight(name, tensor, torch.float32 if name.endswith(FP32_PARAMETERS) else DTYPES[dtype])
        for name, tensor in model.state_dict().items()
    }
    save_file(
        {k: v.contiguous() for k, v in weights.items()}, str(out / WEIGHTS_FILE), metadata={"format": "pt"}
    )
    (out / WEIGHTS_FILE).chmod(0o644)  # safetensors writes 0600; an export is read by servers and other users
    text = json.dumps(hnet_config_json(model.config, dtype), indent=2) + "\n"
    (out / CONFIG_FILE).write_text(text, encoding="utf-8")
    tokenizer.save(out)
    return out


def _read_config(directory: Path) -> dict[str, Any]:
    return read_json_object(directory / CONFIG_FILE)


def is_hnet_dir(directory: str | os.PathLike) -> bool:
    """True when `directory`'s config.json describes an H-Net export (arch "hnet")."""
    return _read_config(Path(directory)).get("arch") == "hnet"


def load_hnet_dir(directory: str | os.PathLike) -> HNetForCausalLM:
    """The H-Net exported to `directory`, in fp32, eval mode; FidelError naming the file on any mismatch."""
    directory = Path(directory)
    data = _read_config(directory)
    if data.get("arch") != "hnet":
        raise FidelError(f"{directory / CONFIG_FILE}: arch is {data.get('arch')!r}, not 'hnet'")
    try:
        config = config_from_dict(data)
    except (FidelError, TypeError, ValueError) as error:
        raise FidelError(f"{directory / CONFIG_FILE}: {error}") from error
    model = HNetForCausalLM(config)
    weights = read_weights(model, directory / WEIGHTS_FILE)
    model.load_state_dict(weights, strict=True)  # copies into the fp32 parameters
    return model.eval()
