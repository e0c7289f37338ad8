"""Where data and runs live: the data directory resolution rule and the run directory layout."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from fidellm.errors import FidelError

DATA_ENV = "FIDELLM_DATA"


def default_shared_data() -> Path | None:
    """`../shared/data` beside the checkout (or beside the current directory), if it exists."""
    beside_checkout = Path(__file__).resolve().parents[3] / "shared" / "data"
    candidates = [Path.cwd() / ".." / "shared" / "data", beside_checkout]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    return None


def resolve_data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """`--data-dir`, else `$FIDELLM_DATA`, else `../shared/data`, else a clear error saying how to get it."""
    for origin, value in (("--data-dir", explicit), (f"${DATA_ENV}", os.environ.get(DATA_ENV))):
        if value:
            path = Path(value).expanduser()
            if not path.is_dir():
                found = "is a file, expected a directory" if path.exists() else "does not exist"
                raise FidelError(f"data directory {path} (from {origin}) {found}")
            return path.resolve()
    shared = default_shared_data()
    if shared is not None:
        return shared
    raise FidelError(
        "no data directory: pass --data-dir, set FIDELLM_DATA, or fetch the public sources with "
        "`fidellm data download --data-dir DIR`"
    )


class RunLayout:
    """The files every stage reads and writes inside one run directory."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    @property
    def data(self) -> Path:
        return self.root / "data"

    def split_dir(self, split: str) -> Path:
        return self.data / "splits" / split

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def tokens(self) -> Path:
        return self.root / "tokens"


def clear_output_dir(directory: Path, overwrite: bool) -> None:
    """Make way for a stage's output directory: refuse an existing one unless `overwrite`, then remove it
    (a symlink itself, never what it points to)."""
    if not (directory.exists() or directory.is_symlink()):
        return
    if not overwrite:
        raise FidelError(f"{directory} already exists; pass --overwrite to replace it")
    if directory.is_dir() and not directory.is_symlink():
        shutil.rmtree(directory)
    else:
        directory.unlink()
