"""glibc malloc thresholds: set on Linux with glibc, left alone when the user set them."""

from __future__ import annotations

import platform
import sys

import pytest

from fidellm.allocator import ENVIRONMENT, keep_freed_memory


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
def test_sets_the_thresholds_on_glibc() -> None:
    assert keep_freed_memory() is True


@pytest.mark.parametrize("name", ENVIRONMENT)
def test_a_users_own_setting_wins(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv(name, "65536")
    assert keep_freed_memory() is False
