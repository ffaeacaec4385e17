"""Remote shards: http(s) through fsspec against a real HTTP server on localhost, and ``pipe:`` commands.

Same samples, same skip counting and the same exact resume as local shards; a connection dropped
mid-shard and a failing command are counted (``corrupt_shard``) and the stream goes on.
"""

from __future__ import annotations

import functools
import http.server
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from mixreorg.data import ShardStream, expand_shards
from mixreorg.data.webdataset import iter_tar_samples, shard_name
from tests.test_data_loaders import (
    GOOD_KEYS,
    _batches,
    _one_epoch,
    _same,
    write_shards,
)


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the folder. ``/cut/NAME`` announces NAME's full Content-Length, sends half and hangs up;
    ``/cut-late/NAME`` does the same after a second's pause (the client has read what came by then)."""

    requests: list[tuple[str, str, str | None]]  # (method, path, Range header), set per server

    def _cut(self, body: bool) -> None:
        prefix, name = self.path.lstrip("/").split("/", 1)
        data = (Path(self.directory) / name).read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-tar")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            if prefix == "cut-late":
                time.sleep(1.0)
            self.connection.shutdown(socket.SHUT_RDWR)
        self.close_connection = True

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.requests.append(("GET", self.path, self.headers.get("Range")))
        if self.path.startswith(("/cut/", "/cut-late/")):
            return self._cut(body=True)
        return super().do_GET()

    def do_HEAD(self) -> None:  # noqa: N802
        self.requests.append(("HEAD", self.path, self.headers.get("Range")))
        if self.path.startswith(("/cut/", "/cut-late/")):
            return self._cut(body=False)
        return super().do_HEAD()

    def log_message(self, *args: object) -> None:
        """Silence the per-request lines SimpleHTTPRequestHandler writes to stderr."""


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[tuple[str, Path, list]]:
    """``(base URL, served folder, request log)`` of a ThreadingHTTPServer on localhost."""
    root = tmp_path / "www"
    write_shards(root)
    log: list[tuple[str, str, str | None]] = []
    handler = type("Handler", (_Handler,), {"requests": log})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", root, log
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


def _keys_images(samples: list[dict]) -> list[tuple[str, torch.Tensor]]:
    return [(s["key"], s["image"]) for s in samples]


# ----------------------------------------------------------------------------------------- http


def test_http_shards_stream_like_local_ones(server) -> None:
    base, root, log = server
    url = f"{base}/shard-{{00000..00001}}.tar"
    assert expand_shards(url) == [f"{base}/shard-00000.tar", f"{base}/shard-00001.tar"]  # no request
    assert log == []
    remote = ShardStream(url, image_size=32, shuffle_block=4, seed=1)
    local = ShardStream(str(root / "shard-{00000..00001}.tar"), image_size=32, shuffle_block=4, seed=1)
    got, want = _one_epoch(remote), _one_epoch(local)
    assert {s["key"] for s in got} == GOOD_KEYS
    assert _same(_keys_images(got), _keys_images(want))
    assert [s["shard"] for s in got] == [s["shard"] for s in want]
    assert remote.stats == local.stats and remote.stats["corrupt_image"] == 1 and remote.stats["missing_caption"] == 1
    assert remote._fingerprint() == local._fingerprint()  # a run may move its shards to object storage
    gets = [r for r in log if r[0] == "GET"]
    assert gets and all(rng is None for _, _, rng in gets)  # streamed by plain GETs, no range requests


@pytest.mark.parametrize("workers", [0, 2])
def test_http_resume_mid_shard_equals_uninterrupted(server, workers: int) -> None:
    base = server[0]

    def make() -> ShardStream:
        return ShardStream(f"{base}/shard-{{00000..00001}}.tar", batch_size=3, image_size=16, shuffle_block=4, seed=7)

    full = _batches(make(), 9, workers)  # crosses epochs and the corrupt samples
    first = make()
    head = _batches(first, 4, workers)
    state = first.state_dict()
    assert any(p[2] > 0 for p in state["pointers"])  # saved in the middle of a shard
    resumed = make()
    resumed.load_state_dict(state)
    tail = _batches(resumed, 5, workers)
    assert _same(head + tail, full)
    assert resumed.stats["samples"] == 27


def test_http_connection_dropped_mid_shard_delivers_the_samples_before_the_cut(server, tmp_path: Path) -> None:
    base, root, _ = server
    cut_url = f"{base}/cut-late/shard-00001.tar"
    # the samples before the cut are delivered: exactly those of a local file cut at the same byte
    data = (root / "shard-00001.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2])
    http_items = list(iter_tar_samples(cut_url))
    local_items = list(iter_tar_samples(str(tmp_path / "cut.tar")))
    assert len(local_items) > 2
    assert [item[:3] for item in http_items[:-1]] == [item[:3] for item in local_items[:-1]]
    assert http_items[-1][2] is None and "ClientPayloadError" in http_items[-1][3]  # ends with the error
    assert all(not item[3] for item in http_items[:-1])

    stream = ShardStream([cut_url, f"{base}/shard-00000.tar"], image_size=16, shuffle_shards=False, shuffle_block=0)
    samples = _one_epoch(stream)
    keys = [s["key"] for s in samples]
    cut_keys = [item[1] for item in local_items[:-1]]
    assert keys == cut_keys + [f"{i:09d}" for i in range(10) if i not in (3, 5)]  # then the next shard, whole
    assert sum(s["_stats"]["corrupt_shard"] for s in samples) == 1  # in this epoch
    (detail,) = [d for r, d in stream.skipped_examples if r == "corrupt_shard"]
    assert cut_url in detail and f"after {len(cut_keys)} samples" in detail


def test_http_connection_dropped_at_once_is_counted_and_the_run_goes_on(server) -> None:
    """Bytes aiohttp had received but not handed over when the connection dropped are lost with the
    error (here all of them: the half shard arrives, then the hang-up): fewer samples, still counted."""
    base = server[0]
    cut_url = f"{base}/cut/shard-00001.tar"
    stream = ShardStream([cut_url, f"{base}/shard-00000.tar"], image_size=16, shuffle_shards=False, shuffle_block=0)
    samples = _one_epoch(stream)
    keys = [s["key"] for s in samples]
    good0 = [f"{i:09d}" for i in range(10) if i not in (3, 5)]
    n_cut = len(keys) - len(good0)  # a prefix of the cut shard, then the next shard, whole
    assert keys == [f"{i:09d}" for i in range(10, 10 + n_cut)] + good0
    assert sum(s["_stats"]["corrupt_shard"] for s in samples) == 1  # in this epoch


def test_http_missing_shard_is_counted_not_fatal(server) -> None:
    base = server[0]
    stream = ShardStream([f"{base}/nope.tar", f"{base}/shard-00000.tar"], image_size=16, shuffle_shards=False)
    samples = _one_epoch(stream)
    assert {s["key"] for s in samples} == {f"{i:09d}" for i in range(10) if i not in (3, 5)}
    assert sum(s["_stats"]["corrupt_shard"] for s in samples) == 1  # in this epoch
    assert any("nope.tar" in d for r, d in stream.skipped_examples if r == "corrupt_shard")


def test_shard_names_drop_the_query_string() -> None:
    assert shard_name("https://h/cc12m/00001.tar?X-Amz-Signature=abc") == "00001.tar"
    assert shard_name("s3://bucket/cc12m/00001.tar") == "00001.tar"
    assert shard_name("/data/cc12m/00001.tar") == "00001.tar"


# ----------------------------------------------------------------------------------------- pipe:


def test_pipe_cat_streams_like_the_file(tmp_path: Path) -> None:
    write_shards(tmp_path)
    spec = f"pipe:cat {tmp_path}/shard-{{00000..00001}}.tar"
    assert expand_shards(spec) == [f"pipe:cat {tmp_path}/shard-0000{i}.tar" for i in range(2)]
    piped = ShardStream(spec, image_size=32, shuffle_block=4, seed=1)
    local = ShardStream(str(tmp_path / "shard-{00000..00001}.tar"), image_size=32, shuffle_block=4, seed=1)
    got, want = _one_epoch(piped), _one_epoch(local)
    assert _same(_keys_images(got), _keys_images(want)) and piped.stats == local.stats

    def make() -> ShardStream:
        return ShardStream(spec, batch_size=3, image_size=16, shuffle_block=4, seed=7)

    full = _batches(make(), 7, 0)
    first = make()
    head = _batches(first, 3, 0)
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    assert _same(head + _batches(resumed, 4, 0), full)


def test_pipe_failure_is_counted_like_a_truncated_shard(tmp_path: Path) -> None:
    write_shards(tmp_path)
    shard0, shard1 = tmp_path / "shard-00000.tar", tmp_path / "shard-00001.tar"
    # a command that writes the whole archive but then fails: its last sample goes with the error
    items = list(iter_tar_samples(f"pipe:cat {shard1}; exit 3"))
    assert [key for _, key, _, err in items[:-1]] == [f"{i:09d}" for i in range(10, 19)]
    assert "exited with status 3" in items[-1][3]
    missing = list(iter_tar_samples(f"pipe:cat {tmp_path}/none.tar"))
    assert len(missing) == 1 and "exited with status 1" in missing[0][3] and "No such file" in missing[0][3]

    stream = ShardStream([f"pipe:cat {tmp_path}/none.tar", f"pipe:cat {shard0}"], image_size=16, shuffle_shards=False)
    samples = _one_epoch(stream)
    assert {s["key"] for s in samples} == {f"{i:09d}" for i in range(10) if i not in (3, 5)}
    assert sum(s["_stats"]["corrupt_shard"] for s in samples) == 1  # in this epoch


def test_abandoned_pipe_is_killed(tmp_path: Path) -> None:
    write_shards(tmp_path)
    pid_file = tmp_path / "pid"
    # the command keeps running after the archive; a reader that stops early does not wait for it
    gen = iter_tar_samples(f"pipe:echo $$ > {pid_file}; cat {tmp_path}/shard-00000.tar; exec sleep 60")
    assert next(gen)[3] == ""
    t0 = time.monotonic()
    gen.close()
    assert time.monotonic() - t0 < 10
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)  # killed and reaped


# ----------------------------------------------------------------------------------------- back-ends


@pytest.mark.parametrize(("url", "extra"), [("s3://bucket/cc12m/{0..1}.tar", "s3"), ("gs://bucket/a.tar", "gcs")])
def test_missing_backend_names_the_extra(monkeypatch: pytest.MonkeyPatch, url: str, extra: str) -> None:
    monkeypatch.setitem(sys.modules, "s3fs", None)  # as if not installed (they are not, in the test extra)
    monkeypatch.setitem(sys.modules, "gcsfs", None)
    with pytest.raises(ImportError, match=rf"pip install mixreorg\[{extra}\]"):
        expand_shards(url)
    monkeypatch.setitem(sys.modules, "fsspec", None)
    with pytest.raises(ImportError, match=rf"pip install mixreorg\[{extra}\]"):
        ShardStream(url)


def test_remote_globs_are_refused() -> None:
    with pytest.raises(ValueError, match="brace pattern"):
        expand_shards("https://h/cc12m/*.tar")
