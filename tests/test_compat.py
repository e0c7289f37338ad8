"""The version checks of fidellm.compat: each refuses exactly the combinations that break, with an error
that says what to install, before anything runs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fidellm import compat
from fidellm.errors import FidelError
from fidellm.train import distributed
from fidellm.train.distributed import Distributed, wrap_model


@pytest.mark.parametrize(
    ("version", "release"), [("2.4.1+cu121", (2, 4)), ("2.13.0+cpu", (2, 13)), ("2.6.0a0+git1234", (2, 6))]
)
def test_torch_release_reads_major_and_minor(monkeypatch: pytest.MonkeyPatch, version: str, release: tuple):
    monkeypatch.setattr(torch, "__version__", version)
    assert compat.torch_release() == release


@pytest.mark.parametrize(
    ("transformers", "torch_release", "refused"),
    [("5.0.0", (2, 4), True), ("5.2.1", (2, 5), True), ("5.0.0", (2, 6), False), ("4.57.6", (2, 4), False)],
)
def test_transformers_5_is_refused_below_torch_2_6(
    monkeypatch: pytest.MonkeyPatch, transformers: str, torch_release: tuple, refused: bool
):
    monkeypatch.setattr(compat.metadata, "version", lambda name: transformers)
    monkeypatch.setattr(compat, "torch_release", lambda: torch_release)
    if refused:
        with pytest.raises(FidelError, match=rf"transformers {transformers} needs torch >= 2\.6"):
            compat.require_transformers_for_torch("LoRA")
    else:
        compat.require_transformers_for_torch("LoRA")


def test_missing_transformers_says_what_to_install(monkeypatch: pytest.MonkeyPatch):
    def not_installed(name: str) -> str:
        raise compat.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(compat.metadata, "version", not_installed)
    with pytest.raises(FidelError, match="pip install transformers"):
        compat.require_transformers_for_torch("lm-eval")


@pytest.mark.parametrize("release", [(2, 4), (2, 8)])
def test_fsdp_on_cpu_is_refused_below_torch_2_9(monkeypatch: pytest.MonkeyPatch, release: tuple):
    monkeypatch.setattr(distributed, "torch_release", lambda: release)
    model = nn.Linear(2, 2)
    with pytest.raises(FidelError, match=r"--strategy fsdp on CPU needs torch >= 2\.9.*--strategy ddp"):
        wrap_model(model, Distributed(rank=0, world_size=2), torch.device("cpu"), "fsdp")
    assert type(model.weight) is nn.Parameter  # nothing was sharded
