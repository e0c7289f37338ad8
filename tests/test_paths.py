"""Data directory resolution (--data-dir, then $FIDELLM_DATA, then ../shared/data, else a clear error) and
staged stage outputs."""

from __future__ import annotations

from pathlib import Path

import pytest

from fidellm import paths
from fidellm.errors import FidelError
from fidellm.paths import staged_output_dir


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


def test_staged_output_dir_replaces_only_a_finished_output(tmp_path: Path) -> None:
    out = tmp_path / "run" / "chat"
    with staged_output_dir(out, overwrite=False) as staging:
        assert staging == tmp_path / "run" / "chat.partial"
        (staging / "report.json").write_text("first")
    assert (out / "report.json").read_text() == "first" and not staging.exists()

    with pytest.raises(FidelError, match="already exists; pass --overwrite"), staged_output_dir(out, False):
        pass
    with pytest.raises(RuntimeError), staged_output_dir(out, overwrite=True) as staging:
        (staging / "report.json").write_text("half")
        raise RuntimeError("a source failed")
    assert (out / "report.json").read_text() == "first"  # the earlier output is untouched
    assert (staging / "report.json").read_text() == "half"  # the failed one stays for inspection

    with staged_output_dir(out, overwrite=True) as staging:
        (staging / "report.json").write_text("second")
    assert (out / "report.json").read_text() == "second" and not staging.exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["chat"]


def test_staged_output_dir_replaces_a_symlink_not_its_target(tmp_path: Path) -> None:
    target = tmp_path / "shared"
    target.mkdir()
    (target / "keep.txt").write_text("kept")
    link = tmp_path / "run" / "data"
    link.parent.mkdir()
    link.symlink_to(target)
    with staged_output_dir(link, overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
    assert not link.is_symlink() and (link / "new.txt").exists() and (target / "keep.txt").exists()
