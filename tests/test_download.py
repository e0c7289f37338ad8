"""`download_sources` against a local HTTP server on 127.0.0.1 (no real network): retries with backoff,
404s, hash mismatches, atomic writes in the shared layout, skipping files already present."""

from __future__ import annotations

import hashlib
import os
import stat
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import zstandard

from fidellm.data.compressed import read_bytes
from fidellm.data.download import CONVERTED_NOTE, content_sha256, download_sources
from fidellm.data.registry import load_registry
from fidellm.errors import FidelError
from fidellm.paths import resolve_data_dir

SMALL = "ሰላም ለዓለም\n".encode() * 10
LARGE = b"".join(f"{i:07d} የአማርኛ መስመር\n".encode() for i in range(12_000))  # > 256 KiB


class Server:
    """Serves `routes[path]`: a list of (status, body, delay[, declared Content-Length]) consumed in order,
    the last one repeating."""

    def __init__(self):
        self.routes: dict[str, list[tuple[int, bytes, float]]] = {}
        self.hits: dict[str, int] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.hits[self.path] = server.hits.get(self.path, 0) + 1
                plan = server.routes.get(self.path, [(404, b"not found", 0.0)])
                status, body, delay, *declared = plan[min(server.hits[self.path], len(plan)) - 1]
                time.sleep(delay)
                self.send_response(status)
                self.send_header("Content-Length", str(declared[0] if declared else len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    running = Server()
    yield running
    running.close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def registry_for(
    tmp_path: Path, server: Server, files: dict[str, tuple[str, bytes]], converted: bool = False
):
    """A user registry with one source `dl` whose files point at the test server.

    `files` maps local path -> (route, expected content)."""
    lines = [
        "sources:",
        "  - name: dl",
        "    section: eval",
        "    format: txt",
        f"    paths: [{next(iter(files))}]",
        "    license: CC0",
        "    license_family: open",
        f"    converted: {'true' if converted else 'false'}",
        "    upstream: {repo: example/repo, commit: " + "a" * 40 + ", paths: [raw/*.html]}",
        "    files:",
    ]
    for local, (route, content) in files.items():
        lines.append(f"      - {{path: {local}, url: '{server.url}{route}', sha256: {sha(content)}}}")
    path = tmp_path / "dl.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return load_registry(path)


def run(tmp_path, registry, **kwargs):
    kwargs.setdefault("backoff", 0.01)
    return download_sources(tmp_path / "data", names=["dl"], registry=registry, progress=False, **kwargs)


def test_downloads_verify_and_store_in_the_shared_layout(tmp_path, server):
    server.routes = {"/small.txt": [(200, SMALL, 0)], "/large.txt": [(200, LARGE, 0)]}
    registry = registry_for(
        tmp_path, server, {"d/small.txt": ("/small.txt", SMALL), "d/large.txt": ("/large.txt", LARGE)}
    )
    report = run(tmp_path, registry)
    assert report.ok and [o.status for o in report.outcomes] == ["downloaded", "downloaded"]
    data = tmp_path / "data" / "d"
    assert (data / "small.txt").read_bytes() == SMALL  # small files stay plain
    assert not (data / "large.txt").exists() and read_bytes(data / "large.txt.zst") == LARGE  # large: zstd
    assert sorted(p.name for p in data.iterdir()) == ["large.txt.zst", "small.txt"]  # no temp files left
    again = run(tmp_path, registry)
    assert [o.status for o in again.outcomes] == ["present", "present"]
    assert server.hits == {"/small.txt": 1, "/large.txt": 1}
    assert "2 downloaded, 0 already present" in str(report) and "0 downloaded, 2 already present" in str(
        again
    )


def test_transient_failures_are_retried_with_backoff(tmp_path, server):
    server.routes = {"/flaky": [(503, b"busy", 0), (503, b"busy", 0), (200, SMALL, 0)]}
    registry = registry_for(tmp_path, server, {"f.txt": ("/flaky", SMALL)})
    started = time.perf_counter()
    report = run(tmp_path, registry, backoff=0.05)
    (outcome,) = report.outcomes
    assert outcome.status == "downloaded" and outcome.attempts == 3 and server.hits["/flaky"] == 3
    assert time.perf_counter() - started >= 0.05 + 0.1  # exponential: 0.05 then 0.1
    assert (tmp_path / "data" / "f.txt").read_bytes() == SMALL


def test_timeouts_are_retried(tmp_path, server):
    server.routes = {"/slow": [(200, SMALL, 1.0), (200, SMALL, 0)]}
    registry = registry_for(tmp_path, server, {"s.txt": ("/slow", SMALL)})
    (outcome,) = run(tmp_path, registry, timeout=0.3).outcomes
    assert outcome.status == "downloaded" and outcome.attempts == 2


def test_retries_give_up_with_a_clear_message(tmp_path, server):
    server.routes = {"/down": [(503, b"busy", 0)]}
    registry = registry_for(tmp_path, server, {"x.txt": ("/down", SMALL)})
    report = run(tmp_path, registry, retries=2)
    (outcome,) = report.failed
    assert (
        outcome.attempts == 3
        and "HTTP 503" in outcome.detail
        and "gave up after 3 attempts" in outcome.detail
    )
    with pytest.raises(FidelError, match=r"1 download\(s\) failed: x.txt: HTTP 503"):
        report.raise_on_failure()


def test_404_is_not_retried_and_other_files_continue(tmp_path, server):
    server.routes = {"/ok": [(200, SMALL, 0)]}
    registry = registry_for(tmp_path, server, {"gone.txt": ("/gone", SMALL), "ok.txt": ("/ok", SMALL)})
    report = run(tmp_path, registry)
    assert [o.status for o in report.outcomes] == ["failed", "downloaded"]
    assert server.hits["/gone"] == 1 and "HTTP 404" in report.failed[0].detail
    assert not (tmp_path / "data" / "gone.txt").exists()


def test_hash_mismatch_writes_nothing(tmp_path, server):
    server.routes = {"/tampered": [(200, SMALL + b"extra", 0)]}
    registry = registry_for(tmp_path, server, {"t.txt": ("/tampered", SMALL)})
    (outcome,) = run(tmp_path, registry).failed
    assert "sha256 mismatch" in outcome.detail and f"expected {sha(SMALL)}" in outcome.detail
    assert list((tmp_path / "data").iterdir()) == []


def test_wrong_local_copy_is_replaced_and_stale_variants_removed(tmp_path, server):
    server.routes = {"/small": [(200, SMALL, 0)]}
    registry = registry_for(tmp_path, server, {"w.txt": ("/small", SMALL)})
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "w.txt.gz").write_bytes(b"not even gzip")
    (outcome,) = run(tmp_path, registry).outcomes
    assert outcome.status == "downloaded"
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["w.txt"]


def test_converted_sources_are_reported_honestly(tmp_path, server):
    registry = registry_for(tmp_path, server, {"c.jsonl": ("/never", SMALL)}, converted=True)
    (outcome,) = run(tmp_path, registry).outcomes
    assert outcome.status == "converted" and CONVERTED_NOTE in outcome.detail
    assert "example/repo@" + "a" * 40 in outcome.detail and not server.hits
    (tmp_path / "data" / "c.jsonl").write_bytes(SMALL)
    assert [o.status for o in run(tmp_path, registry).outcomes] == ["present"]


def test_unknown_sources_and_bad_arguments(tmp_path):
    with pytest.raises(FidelError, match="unknown source nope"):
        download_sources(tmp_path, names=["nope"], progress=False)
    with pytest.raises(FidelError, match="retries must be >= 0"):
        download_sources(tmp_path, retries=-1, progress=False)


def test_registry_hashes_match_the_shared_data():
    data_dir = resolve_data_dir()
    for spec in load_registry().values():
        for item in spec.files:
            variants = [p for p in (data_dir / item.path, Path(f"{data_dir / item.path}.zst")) if p.is_file()]
            assert variants, item.path
            assert content_sha256(variants[0]) == item.sha256, item.path


def test_a_body_cut_short_is_retried_not_reported_as_a_hash_mismatch(tmp_path, server):
    """http.client ends a body shorter than its Content-Length without an error: a dropped connection."""
    server.routes = {"/cut": [(200, SMALL[:40], 0, len(SMALL)), (200, SMALL, 0)]}
    registry = registry_for(tmp_path, server, {"c.txt": ("/cut", SMALL)})
    (outcome,) = run(tmp_path, registry).outcomes
    assert outcome.status == "downloaded" and outcome.attempts == 2 and server.hits["/cut"] == 2
    assert (tmp_path / "data" / "c.txt").read_bytes() == SMALL
    server.routes, server.hits = {"/cut": [(200, SMALL[:40], 0, len(SMALL))]}, {}
    (tmp_path / "data" / "c.txt").unlink()
    (outcome,) = run(tmp_path, registry, retries=1).outcomes
    assert outcome.status == "failed" and "connection dropped after 40 of 230 bytes" in outcome.detail
    assert list((tmp_path / "data").iterdir()) == []


def test_downloaded_files_get_the_usual_permissions(tmp_path, server):
    """Small files were renamed from a private temp file (0600): unreadable to the data dir's other users."""
    server.routes = {"/small.txt": [(200, SMALL, 0)], "/large.txt": [(200, LARGE, 0)]}
    registry = registry_for(
        tmp_path, server, {"small.txt": ("/small.txt", SMALL), "large.txt": ("/large.txt", LARGE)}
    )
    umask = os.umask(0o022)
    try:
        assert run(tmp_path, registry).ok
    finally:
        os.umask(umask)
    for name in ("small.txt", "large.txt.zst"):
        assert stat.S_IMODE((tmp_path / "data" / name).stat().st_mode) == 0o644, name


def test_a_right_copy_behind_a_wrong_one_the_readers_prefer_is_not_present(tmp_path, server):
    """The data stage reads X before X.zst: a right X.zst does not make a wrong X 'present'."""
    server.routes = {"/small": [(200, SMALL, 0)]}
    registry = registry_for(tmp_path, server, {"w.txt": ("/small", SMALL)})
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "w.txt").write_bytes(b"an old copy")
    (tmp_path / "data" / "w.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(SMALL))
    (outcome,) = run(tmp_path, registry).outcomes
    assert outcome.status == "downloaded" and server.hits["/small"] == 1
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["w.txt"]
    assert (tmp_path / "data" / "w.txt").read_bytes() == SMALL


def test_a_file_that_cannot_be_written_fails_alone(tmp_path, server):
    """A file in the way of a folder raised FileExistsError out of download_sources, and the files after
    it were never fetched: it is now one failed outcome naming the path, and the others continue."""
    server.routes = {"/a": [(200, SMALL, 0)], "/b": [(200, SMALL, 0)]}
    registry = registry_for(tmp_path, server, {"d/x.txt": ("/a", SMALL), "y.txt": ("/b", SMALL)})
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "d").write_text("in the way", encoding="utf-8")
    report = run(tmp_path, registry)
    assert [o.status for o in report.outcomes] == ["failed", "downloaded"]
    detail = report.failed[0].detail
    assert "FileExistsError" in detail and str(tmp_path / "data" / "d") in detail
    assert (tmp_path / "data" / "y.txt").read_bytes() == SMALL


@pytest.mark.parametrize(
    ("route", "content", "blocked"), [("/s", SMALL, "s.txt"), ("/l", LARGE, "s.txt.zst")]
)
def test_a_failed_move_into_place_leaves_no_temp_file(tmp_path, server, route, content, blocked):
    server.routes = {route: [(200, content, 0)]}
    registry = registry_for(tmp_path, server, {"s.txt": (route, content)})
    (tmp_path / "data" / blocked).mkdir(parents=True)  # a directory where the file goes
    (outcome,) = run(tmp_path, registry).outcomes
    assert outcome.status == "failed" and "Error" in outcome.detail
    assert [p.name for p in (tmp_path / "data").iterdir()] == [blocked]


def test_a_source_named_twice_is_fetched_and_counted_once(tmp_path, server):
    server.routes = {"/small": [(200, SMALL, 0)]}
    registry = registry_for(tmp_path, server, {"w.txt": ("/small", SMALL)})
    report = download_sources(
        tmp_path / "data", names=["dl", "dl"], registry=registry, progress=False, backoff=0.01
    )
    assert [o.status for o in report.outcomes] == ["downloaded"]
    assert report.lines()[-1].startswith("1 downloaded, 0 already present")
