"""Fixtures several test modules share."""

from __future__ import annotations

from pathlib import Path

import pytest

from fixtures.train.build_run import build_flores_run


@pytest.fixture(scope="module")
def flores_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared and tokenized run of the FLORES text, built once per test module (training tests)."""
    return build_flores_run(tmp_path_factory.mktemp("flores"))
