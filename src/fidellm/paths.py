"""Where data and runs live: the data directory resolution rule and the run directory layout."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
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


def _remove(path: Path) -> None:
    """Remove a directory tree, or a symlink or file itself (never what a symlink points to)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def make_output_dir(directory: Path) -> None:
    """Create `directory` (and its parents); a file in the way is a one-line error, not a traceback."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a file where a folder should be, no permission, ...
        raise FidelError(f"{directory}: cannot create the output directory: {error.strerror}") from None


@contextlib.contextmanager
def staged_output_dir(directory: Path, overwrite: bool) -> Iterator[Path]:
    """A stage's output directory, written as DIR.partial and put in place of DIR only when the stage
    succeeds, so a failed rerun with --overwrite leaves the previous output as it was. An existing DIR
    is refused unless `overwrite` (before any work). A failed run's DIR.partial stays for inspection and
    is cleared by the next run."""
    if (directory.exists() or directory.is_symlink()) and not overwrite:
        raise FidelError(f"{directory} already exists; pass --overwrite to replace it")
    staging = directory.with_name(directory.name + ".partial")
    _remove(staging)
    try:
        staging.mkdir(parents=True)
    except OSError as error:  # a file where a folder should be, no permission, ...
        raise FidelError(f"{directory}: cannot create {staging}: {error.strerror}") from error
    yield staging
    replaced = directory.with_name(directory.name + ".replaced")
    _remove(replaced)
    if directory.exists() or directory.is_symlink():
        directory.rename(replaced)
    staging.rename(directory)
    _remove(replaced)
