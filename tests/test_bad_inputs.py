"""A bad --device is one clear line from every command that takes one, never a torch traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fidellm.cli import main
from fidellm.errors import FidelError
from fidellm.models.load import load_model
from fidellm.train.distributed import pick_device


def test_valid_devices_are_kept() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device(torch.device("cpu")) == torch.device("cpu")
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_invalid_device_string_names_the_option(tmp_path: Path) -> None:
    with pytest.raises(FidelError, match=r"^--device bogus: not a torch device"):
        pick_device("bogus")
    with pytest.raises(FidelError, match=r"^--device cuda:x: not a torch device"):
        pick_device("cuda:x")
    with pytest.raises(FidelError, match=r"^--device bogus: "):  # checked before the path is even read
        load_model(tmp_path, "bogus")


def test_cuda_without_cuda_says_so(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(FidelError, match=r"^--device cuda: this torch .* has no CUDA"):
        pick_device("cuda")
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    with pytest.raises(FidelError, match=r"^--device cuda:1: no CUDA GPU is visible"):
        pick_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert pick_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(FidelError, match=r"^--device cuda:1: only 1 CUDA device"):
        pick_device("cuda:1")


def test_unavailable_mps_says_so(monkeypatch) -> None:
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(FidelError, match=r"^--device mps: .*no MPS"):
        pick_device("mps")


@pytest.mark.parametrize("command", ["train", "eval", "generate", "chat", "serve"])
def test_every_command_reports_a_bad_device(command: str, tmp_path: Path, capsys) -> None:
    extra = ["hello"] if command == "generate" else []
    with pytest.raises(SystemExit) as exited:
        main([command, str(tmp_path), *extra, "--device", "bogus"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.startswith("error: --device bogus: ") and err.count("\n") == 1
