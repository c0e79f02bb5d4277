"""URIs of every scheme: local, file://, memory://, http:// on 127.0.0.1; clear errors for the rest."""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path

import fsspec
import numpy as np
import pytest

from pathray.storage import UnsupportedSchemeError, parse_uri
from pathray.wsi.backends import SlideNotFoundError
from pathray.wsi.backends.open import open_slide


@pytest.mark.parametrize(
    ("uri", "protocol", "path"),
    [
        ("/data/a.svs", "file", "/data/a.svs"),
        ("file:///data/a%20b.svs", "file", "/data/a b.svs"),
        ("s3://bucket/dir/a.svs", "s3", "bucket/dir/a.svs"),
        ("gs://bucket/a.svs", "gs", "bucket/a.svs"),
        ("memory://x/a.svs", "memory", "x/a.svs"),
        ("http://127.0.0.1:8000/a.svs", "http", "http://127.0.0.1:8000/a.svs"),
    ],
)
def test_parse_uri(uri, protocol, path):
    loc = parse_uri(uri)
    assert (loc.protocol, loc.path) == (protocol, path)


@pytest.mark.parametrize(
    ("uri", "words"),
    [
        ("ftp://host/a.svs", "scheme 'ftp' is not supported"),
        ("s3:///a.svs", "needs a bucket"),
        ("file://otherhost/a.svs", "must not name a host"),
    ],
)
def test_bad_locations_are_refused(uri, words):
    with pytest.raises(UnsupportedSchemeError, match=words):
        open_slide(uri, cache=False)


def test_missing_file_is_not_found(tmp_path):
    with pytest.raises(SlideNotFoundError) as info:
        open_slide(tmp_path / "nope.svs", cache=False)
    assert str(tmp_path / "nope.svs") in str(info.value)


def test_file_uri_and_plain_path_read_the_same(testdata):
    path = testdata / "aperio/CMU-1-Small-Region.svs"
    a = open_slide(path, cache=False).read_region(100, 100, 0, 64)
    b = open_slide(path.as_uri(), cache=False).read_region(100, 100, 0, 64)
    assert np.array_equal(a, b)


def test_memory_uri(testdata):
    data = (testdata / "aperio/CMU-1-Small-Region.svs").read_bytes()
    fs = fsspec.filesystem("memory")
    fs.pipe("/pathray-test/cmu.svs", data)
    try:
        slide = open_slide("memory://pathray-test/cmu.svs", cache=False)
        local = open_slide(testdata / "aperio/CMU-1-Small-Region.svs", cache=False)
        assert slide.dimensions == local.dimensions
        assert np.array_equal(slide.read_region(500, 700, 0, 96), local.read_region(500, 700, 0, 96))
    finally:
        fs.rm("/pathray-test", recursive=True)


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with single byte-range support, as object stores and web servers have."""

    ranges_served = 0

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        spec = self.headers.get("Range")
        path = Path(self.translate_path(self.path))
        if not spec or not path.is_file():
            return super().do_GET()
        start_s, end_s = spec.removeprefix("bytes=").split("-")
        data = path.read_bytes()
        start = int(start_s)
        end = min(int(end_s) if end_s else len(data) - 1, len(data) - 1)
        body = data[start : end + 1]
        type(self).ranges_served += 1
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def http_root(testdata):
    handler = functools.partial(_RangeHandler, directory=str(testdata))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_uri_reads_by_ranges(http_root, testdata):
    slide = open_slide(f"{http_root}/aperio/CMU-1-Small-Region.svs", cache=False)
    local = open_slide(testdata / "aperio/CMU-1-Small-Region.svs", cache=False)
    served = _RangeHandler.ranges_served
    assert np.array_equal(slide.read_region(1000, 1500, 0, 128), local.read_region(1000, 1500, 0, 128))
    assert _RangeHandler.ranges_served > served
    # a 128 px region of a 1.9 MB slide: headers plus a few tiles, nowhere near the whole file
    assert slide.bytes_read < 0.5 * (testdata / "aperio/CMU-1-Small-Region.svs").stat().st_size


def test_http_missing_is_not_found(http_root):
    with pytest.raises(SlideNotFoundError):
        open_slide(f"{http_root}/nope.svs", cache=False)


def test_open_slide_caches_handles(testdata):
    path = testdata / "aperio/small.svs"
    assert open_slide(path) is open_slide(path)
    assert open_slide(path) is not open_slide(path, mpp=0.25)


def test_handles_are_safe_across_threads(testdata):
    from concurrent.futures import ThreadPoolExecutor

    slide = open_slide(testdata / "aperio/CMU-1-Small-Region.svs", cache=False, tile_cache=0)
    coords = [(x, y) for x in range(0, 1900, 190) for y in range(0, 2600, 260)]
    expected = [slide.read_region(x, y, 0, 100) for x, y in coords]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda c: slide.read_region(c[0], c[1], 0, 100), coords))
    assert all(np.array_equal(a, b) for a, b in zip(expected, got, strict=True))


def test_unicode_path(testdata):
    path = Path(testdata / "aperio/unicode-name/😐.svs")
    assert open_slide(path, cache=False).dimensions == (16, 16)


def test_coalesce_merges_touching_and_near_ranges():
    from pathray.wsi.backends.ranges import coalesce

    offsets, lengths = [300, 0, 100, 1000], [50, 100, 100, 10]
    assert coalesce(offsets, lengths, 0) == [(0, 200, [1, 2]), (300, 350, [0]), (1000, 1010, [3])]
    assert coalesce(offsets, lengths, 100) == [(0, 350, [1, 2, 0]), (1000, 1010, [3])]
    assert coalesce(offsets, lengths, 10_000) == [(0, 1010, [1, 2, 0, 3])]


class _NoRangeHandler(_RangeHandler):
    """A server that ignores Range and always sends the whole file."""

    def do_GET(self) -> None:  # noqa: N802
        return http.server.SimpleHTTPRequestHandler.do_GET(self)


@pytest.mark.parametrize("gap", [0, 1 << 20])
def test_a_server_ignoring_ranges_still_gives_right_pixels(testdata, gap):
    from pathray.storage import StorageConfig

    handler = functools.partial(_NoRangeHandler, directory=str(testdata))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/aperio/CMU-1-Small-Region.svs"
        slide = open_slide(url, StorageConfig(coalesce_gap=gap), cache=False, tile_cache=0)
        local = open_slide(testdata / "aperio/CMU-1-Small-Region.svs", cache=False)
        coords = [(300, 400), (1500, 2500), (1000, 100)]
        for a, b in zip(
            slide.read_batch(coords, 200, 0.499), local.read_batch(coords, 200, 0.499), strict=True
        ):
            assert np.array_equal(a, b)
    finally:
        server.shutdown()
        server.server_close()
