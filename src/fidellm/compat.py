"""What changes across the torch releases we support (2.4 and newer), checked up front with a clear error.

- transformers 5 needs torch >= 2.6: with an older torch it imports without its PyTorch half, and peft
  (LoRA) and lm-evaluation-harness then fail deep inside it. With torch 2.4 or 2.5, use transformers 4.x.
- FSDP2 (`fully_shard`) over CPU processes (gloo) needs torch >= 2.9: 2.4 to 2.6 drive CUDA streams even
  for CPU tensors and fail, 2.7 and 2.8 run but sum the gradients over the ranks instead of averaging
  them (measured: a 2-process run's gradient norm is twice a single process's). DDP works on CPU
  everywhere, and FSDP2 on CUDA (NCCL) is not affected. FIDELLM_ALLOW_CPU_FSDP=1 lifts the check, so
  `benchmarks/fsdp_cpu_check.py` can show what another release does.
"""

from __future__ import annotations

from importlib import metadata

import torch

from fidellm.errors import FidelError

FSDP_ON_CPU = (2, 9)
"""The first torch release whose FSDP2 trains CPU processes correctly."""
TRANSFORMERS_5_TORCH = (2, 6)
"""The oldest torch release transformers 5 accepts."""


def torch_release() -> tuple[int, int]:
    """(major, minor) of the installed torch, e.g. (2, 4) for "2.4.1+cu121"."""
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def require_transformers_for_torch(purpose: str) -> None:
    """Raise a FidelError saying what to install when the installed transformers refuses this torch."""
    try:
        version = metadata.version("transformers")
    except metadata.PackageNotFoundError:
        raise FidelError(f"{purpose} needs transformers: pip install transformers") from None
    if int(version.split(".")[0]) >= 5 and torch_release() < TRANSFORMERS_5_TORCH:
        raise FidelError(
            f"{purpose} needs transformers, and transformers {version} needs torch >= 2.6 (this is torch"
            f" {torch.__version__}): pip install 'transformers>=4.45,<5', or upgrade torch"
        )
