"""Data directory resolution: --data-dir, then $FIDELLM_DATA, then ../shared/data, else a clear error."""

from __future__ import annotations

import pytest

from fidellm import paths
from fidellm.errors import FidelError


def test_explicit_beats_environment(tmp_path, monkeypatch):
    explicit, env = tmp_path / "a", tmp_path / "b"
    explicit.mkdir()
    env.mkdir()
    monkeypatch.setenv(paths.DATA_ENV, str(env))
    assert paths.resolve_data_dir(explicit) == explicit.resolve()
    assert paths.resolve_data_dir() == env.resolve()


def test_missing_directory_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv(paths.DATA_ENV, raising=False)
    with pytest.raises(FidelError, match="--data-dir"):
        paths.resolve_data_dir(tmp_path / "nope")
    monkeypatch.setenv(paths.DATA_ENV, str(tmp_path / "gone"))
    with pytest.raises(FidelError, match="FIDELLM_DATA"):
        paths.resolve_data_dir()


def test_a_file_given_as_data_directory_is_named(tmp_path):
    (tmp_path / "data.txt").write_text("not a directory")
    with pytest.raises(FidelError, match=r"data\.txt \(from --data-dir\) is a file, expected a directory"):
        paths.resolve_data_dir(tmp_path / "data.txt")


def test_no_data_anywhere_says_how_to_get_it(monkeypatch):
    monkeypatch.delenv(paths.DATA_ENV, raising=False)
    monkeypatch.setattr(paths, "default_shared_data", lambda: None)
    with pytest.raises(FidelError, match="fidellm data download"):
        paths.resolve_data_dir()


def test_shared_data_beside_checkout_is_found(monkeypatch):
    monkeypatch.delenv(paths.DATA_ENV, raising=False)
    found = paths.resolve_data_dir()
    assert (found / "MANIFEST.md").is_file()
