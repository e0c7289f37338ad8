"""`fidellm data download`: fetch the exact-copy source files from their canonical URLs into a data dir.

Each file is fetched with retries and exponential backoff (HTTP 5xx/429, timeouts and dropped connections are
retried; other HTTP errors such as 404 are not), checked against the registry's sha256 of its uncompressed
content, and written atomically (temp file + rename) in the shared layout: zstd-compressed as `X.zst` when it
is larger than 256 KB, plain otherwise. Files already present with the right hash are skipped. Converted
sources have no single canonical URL; the report says so and names their upstream repo@commit.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

from fidellm.data.compressed import COMPRESSED_SUFFIXES, iter_chunks
from fidellm.data.registry import DownloadFile, SourceSpec, load_registry
from fidellm.errors import FidelError

COMPRESS_ABOVE = 256 * 1024
RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
CONVERTED_NOTE = (
    "converted in the shared snapshot: not fetchable from one canonical URL; copy from shared data"
)
USER_AGENT = "fidel-lm data download"


@dataclass
class FileOutcome:
    """What happened to one file (or, for a converted source without a local copy, to the whole source).

    status: downloaded | present | converted | failed.
    """

    source: str
    path: str
    status: str
    detail: str = ""
    attempts: int = 0
    size: int = 0

    def line(self) -> str:
        return f"{self.status:10s} {self.source}: {self.path}" + (f" — {self.detail}" if self.detail else "")


@dataclass
class DownloadReport:
    """Every outcome of one `download_sources` call, in registry order."""

    data_dir: Path
    outcomes: list[FileOutcome] = field(default_factory=list)

    @property
    def failed(self) -> list[FileOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    @property
    def ok(self) -> bool:
        return not self.failed

    def count(self, status: str) -> int:
        return sum(1 for o in self.outcomes if o.status == status)

    def lines(self) -> list[str]:
        """One line per outcome plus a summary line, for the CLI."""
        out = [o.line() for o in self.outcomes]
        out.append(
            f"{self.count('downloaded')} downloaded, {self.count('present')} already present, "
            f"{self.count('converted')} converted (copy from shared data), {len(self.failed)} failed "
            f"in {self.data_dir}"
        )
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())

    def raise_on_failure(self) -> None:
        """FidelError naming every failed file (the CLI calls this after printing the report)."""
        if self.failed:
            listed = "; ".join(f"{o.path}: {o.detail}" for o in self.failed)
            raise FidelError(f"{len(self.failed)} download(s) failed: {listed}")


def local_variants(data_dir: Path, relative: str) -> list[Path]:
    """The files that may hold `relative` in the data dir: X, X.zst, X.gz (existing ones only)."""
    base = data_dir / relative
    return [p for p in (base, *(Path(str(base) + s) for s in COMPRESSED_SUFFIXES)) if p.is_file()]


def content_sha256(path: Path) -> str | None:
    """sha256 of the uncompressed content, or None when the file is unreadable (corrupt, empty)."""
    digest = hashlib.sha256()
    try:
        for chunk in iter_chunks(path):
            digest.update(chunk)
    except FidelError:
        return None
    return digest.hexdigest()


def _present(data_dir: Path, item: DownloadFile) -> Path | None:
    """The local copy when it has the right hash. Only the variant the readers take counts (X, then
    X.zst, then X.gz, as `sources.locate` prefers them): a right X.zst behind a wrong X is not present."""
    variants = local_variants(data_dir, item.path)
    if variants and content_sha256(variants[0]) == item.sha256:
        return variants[0]
    return None


class _Transient(Exception):
    """A failure worth retrying, with the server's Retry-After (seconds) if it sent one."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


def _classify(error: BaseException, url: str) -> Exception | None:
    """A retryable `_Transient`, a final FidelError, or None for errors that must propagate unchanged."""
    if isinstance(error, urllib.error.HTTPError):
        if error.code in RETRY_STATUS or error.code >= 500:
            retry_after = error.headers.get("Retry-After") if error.headers else None
            delay = float(retry_after) if retry_after and retry_after.isdigit() else None
            return _Transient(f"HTTP {error.code} {error.reason}", delay)
        return FidelError(f"HTTP {error.code} {error.reason} for {url}")
    if isinstance(error, (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException)):
        return _Transient(f"{type(error).__name__}: {getattr(error, 'reason', error)}")
    return None


def _fetch(url: str, target_dir: Path, timeout: float) -> tuple[Path, str, int]:
    """One attempt: stream `url` into a temp file in `target_dir`; returns (temp path, sha256, size)."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    digest, size = hashlib.sha256(), 0
    with tempfile.NamedTemporaryFile(
        dir=target_dir, prefix=".download-", suffix=".part", delete=False
    ) as handle:
        temp = Path(handle.name)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                for chunk in iter(lambda: response.read(1 << 16), b""):
                    digest.update(chunk)
                    handle.write(chunk)
                    size += len(chunk)
                declared = response.headers.get("Content-Length", "")
                if declared.isdigit() and size < int(declared):  # http.client ends a cut body silently
                    raise _Transient(f"connection dropped after {size} of {declared} bytes")
        except BaseException as error:
            handle.close()
            temp.unlink(missing_ok=True)
            mapped = _classify(error, url)
            if mapped is None:
                raise
            raise mapped from error
    return temp, digest.hexdigest(), size


def _install(temp: Path, data_dir: Path, relative: str) -> Path:
    """Move a verified download into place (zstd-compressed when large) and drop stale variants."""
    base = data_dir / relative
    if temp.stat().st_size > COMPRESS_ABOVE:
        final = Path(str(base) + ".zst")
        ready = Path(str(temp) + ".zst")
        try:
            with open(temp, "rb") as source, open(ready, "wb") as sink:
                zstandard.ZstdCompressor(level=19).copy_stream(source, sink)
        except BaseException:
            ready.unlink(missing_ok=True)
            raise
        finally:
            temp.unlink()
    else:
        final, ready = base, temp
    try:
        if ready == temp:
            umask = os.umask(0)
            os.umask(umask)
            temp.chmod(0o666 & ~umask)  # a temp file is private (0600); the data dir's files are shared
        os.replace(ready, final)
    except BaseException:  # e.g. a directory where the file goes: leave no temp file behind
        ready.unlink(missing_ok=True)
        raise
    for stale in local_variants(data_dir, relative):
        if stale != final:
            stale.unlink()
    return final


def _download_file(
    spec: SourceSpec, item: DownloadFile, data_dir: Path, retries: int, timeout: float, backoff: float
) -> FileOutcome:
    url = spec.url_for(item)
    if url is None:
        return FileOutcome(spec.name, item.path, "failed", "no canonical URL in the registry")
    target_dir = (data_dir / item.path).parent
    target_dir.mkdir(parents=True, exist_ok=True)
    attempt = 0
    while True:
        attempt += 1
        try:
            temp, sha, size = _fetch(url, target_dir, timeout)
        except _Transient as error:
            if attempt > retries:
                detail = f"{error} from {url}; gave up after {attempt} attempts"
                return FileOutcome(spec.name, item.path, "failed", detail, attempt)
            time.sleep(max(backoff * 2 ** (attempt - 1), min(error.retry_after or 0.0, 60.0)))
            continue
        except FidelError as error:
            return FileOutcome(spec.name, item.path, "failed", str(error), attempt)
        if sha != item.sha256:
            temp.unlink()
            detail = (
                f"sha256 mismatch for {url}: expected {item.sha256}, got {sha} ({size} bytes); not written"
            )
            return FileOutcome(spec.name, item.path, "failed", detail, attempt, size)
        final = _install(temp, data_dir, item.path)
        return FileOutcome(spec.name, item.path, "downloaded", f"{url} -> {final.name}", attempt, size)


def _converted(spec: SourceSpec, item: DownloadFile) -> FileOutcome:
    upstream = f"{spec.upstream_repo}@{spec.upstream_commit}"
    if spec.upstream_paths:
        upstream += ": " + ", ".join(spec.upstream_paths)
    return FileOutcome(spec.name, item.path, "converted", f"{CONVERTED_NOTE} (upstream {upstream})")


def download_sources(
    data_dir: str | os.PathLike,
    names: list[str] | None = None,
    retries: int = 4,
    timeout: float = 60,
    progress: bool = True,
    *,
    registry: Mapping[str, SourceSpec] | None = None,
    backoff: float = 1.0,
) -> DownloadReport:
    """Fetch every file of the named sources (default: all registry sources with files) into `data_dir`.

    Never raises for a single failed file: failures are in the report (see `DownloadReport.raise_on_failure`).
    """
    if retries < 0:
        raise FidelError(f"--retries must be >= 0, got {retries}")
    registry = registry if registry is not None else load_registry()
    unknown = [n for n in names or [] if n not in registry]
    if unknown:
        raise FidelError(f"unknown source {', '.join(unknown)}; known: {', '.join(registry)}")
    root = Path(data_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    report = DownloadReport(root.resolve())
    chosen = [registry[n] for n in dict.fromkeys(names or [])] or [s for s in registry.values() if s.files]

    def emit(outcome: FileOutcome) -> None:
        report.outcomes.append(outcome)
        if progress:
            print(outcome.line(), file=sys.stderr, flush=True)

    for spec in chosen:
        if not spec.files:
            emit(FileOutcome(spec.name, "-", "failed", "the registry lists no files to download"))
        for item in spec.files:
            present = _present(root, item)
            if present is not None:
                emit(FileOutcome(spec.name, item.path, "present", f"sha256 ok ({present.name})"))
            elif spec.converted:
                emit(_converted(spec, item))
            else:
                try:
                    emit(_download_file(spec, item, root, retries, timeout, backoff))
                except OSError as error:  # a file in the way, a full disk, no permission: this file fails
                    emit(FileOutcome(spec.name, item.path, "failed", f"{type(error).__name__}: {error}"))
    return report
