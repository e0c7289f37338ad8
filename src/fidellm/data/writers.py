"""The gzip JSONL writer of `data prepare`: datatrove's JsonlWriter at zlib's default level.

datatrove opens its outputs through fsspec, whose "gzip" is Python's GzipFile at level 9. On the
prepared Amharic text level 9 took 27 s of a 6-minute single-process prepare profile; level 6 writes
the same 156 MB in 11 s, 3.5% larger (benchmarks/RESULTS.md, "gzip level"). Readers are unchanged:
any gzip reader reads either.
"""

from __future__ import annotations

import gzip
from typing import IO

from datatrove.pipeline.writers import JsonlWriter
from fsspec.compression import register_compression

GZIP_LEVEL = 6
COMPRESSION = f"gzip-{GZIP_LEVEL}"


def _gzip_file(infile: IO[bytes], mode: str = "rb", **kwargs) -> gzip.GzipFile:
    return gzip.GzipFile(fileobj=infile, mode=mode, compresslevel=GZIP_LEVEL, **kwargs)


# No file extension: ".gz" still infers plain "gzip" for readers. Registered at import, so also in each
# datatrove worker process that unpickles a GzipJsonlWriter.
register_compression(COMPRESSION, _gzip_file, [], force=True)


class GzipJsonlWriter(JsonlWriter):
    """JsonlWriter to `output_filename` (ending in .gz) at gzip level GZIP_LEVEL."""

    def __init__(self, output_folder: str, output_filename: str):
        if not output_filename.endswith(".gz"):
            raise ValueError(f"a gzip output name ends in .gz, got {output_filename!r}")
        super().__init__(output_folder, output_filename=output_filename, compression=COMPRESSION)
