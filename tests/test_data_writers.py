"""The gzip writer of `data prepare`: level 6, readable by any gzip reader, usable in a fresh worker."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import dill
import pytest
from datatrove.data import Document

from fidellm.data.writers import GzipJsonlWriter


def test_writes_readable_gzip_at_the_default_zlib_level(tmp_path: Path) -> None:
    with GzipJsonlWriter(str(tmp_path), "${rank}.jsonl.gz") as writer:
        writer.write(Document(text="ሰላም ለዓለም", id="a"), rank=0)
    raw = (tmp_path / "00000.jsonl.gz").read_bytes()
    assert raw[:2] == b"\x1f\x8b" and raw[8] == 0  # gzip XFL: 2 would mean level 9, 4 level 1
    assert json.loads(gzip.decompress(raw))["text"] == "ሰላም ለዓለም"
    with pytest.raises(ValueError, match=r"ends in \.gz"):
        GzipJsonlWriter(str(tmp_path), "${rank}.jsonl")


def test_a_fresh_worker_process_writes_with_an_unpickled_writer(tmp_path: Path) -> None:
    """datatrove's workers start fresh (forkserver) and unpickle the pipeline: the level-6 codec must
    be registered there too, by importing the writer's module."""
    code = (
        "import sys, dill\nfrom datatrove.data import Document\n"
        "writer = dill.loads(sys.stdin.buffer.read())\n"
        "writer.write(Document(text='ቡና', id='b'), rank=3)\nwriter.close()\n"
    )
    payload = dill.dumps(GzipJsonlWriter(str(tmp_path), "${rank}.jsonl.gz"))
    done = subprocess.run([sys.executable, "-c", code], input=payload, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    assert json.loads(gzip.decompress((tmp_path / "00003.jsonl.gz").read_bytes()))["text"] == "ቡና"
