"""Ranged reads on the SeaweedFS endpoint (127.0.0.1): merged, concurrent and cached, yet the same bytes.

Requests are counted by a wrapper around the real HTTP connection pool the reads go through;
faults are real too (the endpoint is paused with SIGSTOP and let go again).
"""

from __future__ import annotations

import http.server
import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pathray.storage import StorageConfig, parse_uri
from pathray.wsi.backends import ByteCounter, RangeReader, SlideUnavailableError, open_slide
from pathray.wsi.backends.blocks import AbandonedFetch, BlockCache, coalesce
from pathray.wsi.backends.ranges import _shared, block_cache

pytestmark = pytest.mark.s3

SLIDES = ("aperio/CMU-1-Small-Region.svs", "aperio/tcga-cr-7395-01a-01-ts1.svs")


@pytest.fixture(scope="module")
def uploaded(object_store, testdata) -> dict[str, tuple[Path, str]]:
    """Each real test slide: its local path and its s3:// URI on the endpoint."""
    return {
        name: (
            testdata / name,
            object_store.upload_file(testdata / name, object_store.url_for(f"ranged/{name}")),
        )
        for name in SLIDES
    }


def tile_ranges(path: Path) -> tuple[list[int], list[int]]:
    """Byte ranges of every stored tile or strip of the file (all pages), as a slide reader sees them."""
    import tifffile

    offsets: list[int] = []
    lengths: list[int] = []
    with tifffile.TiffFile(path) as tif:
        for page in tif.pages:
            for off, n in zip(page.dataoffsets, page.databytecounts, strict=True):
                if n:
                    offsets.append(int(off))
                    lengths.append(int(n))
    return offsets, lengths


def shuffled(path: Path, count: int, seed: int) -> tuple[list[int], list[int]]:
    offsets, lengths = tile_ranges(path)
    order = np.random.default_rng(seed).permutation(len(offsets))[:count]
    return [offsets[i] for i in order], [lengths[i] for i in order]


class Requests:
    """The GETs the process's connection pool for one ``read_concurrency`` sends: a counting wrapper
    around the real pool (every request still goes to the endpoint); ``before_send`` can act on
    request n."""

    def __init__(self, pool, monkeypatch) -> None:
        self.pool = pool
        self.ranges: list[tuple[int, int]] = []
        self.before_send = None
        self._lock = threading.Lock()
        real = pool.get

        def get(url, headers, *args, **kwargs):
            with self._lock:
                first, last = headers["Range"].removeprefix("bytes=").split("-")
                self.ranges.append((int(first), int(last) + 1))
                n = len(self.ranges)
            if self.before_send is not None:
                self.before_send(n)
            return real(url, headers, *args, **kwargs)

        monkeypatch.setattr(pool, "get", get)

    @property
    def count(self) -> int:
        return len(self.ranges)


@pytest.fixture
def requests_of(monkeypatch):
    """``requests_of(storage)``: a ``Requests`` counter on the HTTP pool that ``storage``'s reads use."""

    def make(storage: StorageConfig) -> Requests:
        return Requests(_shared("http", storage.read_concurrency), monkeypatch)

    return make


@pytest.fixture
def store(object_store) -> Iterator:
    """The session's endpoint, answering again after each test whatever the test did to it."""
    try:
        yield object_store
    finally:
        object_store.resume()


def reader(uri: str, storage: StorageConfig) -> RangeReader:
    return RangeReader(parse_uri(uri), storage, ByteCounter())


CONFIGS = {
    "exact": {"coalesce_gap": 0},
    "default": {},
    "merged, small requests": {"coalesce_gap": 2**20, "max_request_bytes": 65536},
    "one thread": {"read_concurrency": 1},
    "block cache": {"block_cache_bytes": 2**20, "block_cache_block": 16384},
    "filesystem": {"presigned_reads": False},
}


@pytest.mark.parametrize("config", CONFIGS)
def test_merged_concurrent_and_cached_reads_return_the_local_bytes(uploaded, s3_storage, config):
    storage = s3_storage.model_copy(update=CONFIGS[config])
    for name, (path, uri) in uploaded.items():
        blob = path.read_bytes()
        offsets, lengths = shuffled(path, 120, seed=len(name))
        offsets += [0, 7, len(blob) - 5]  # the header, and the object's last bytes
        lengths += [16, 0, 5]
        rr = reader(uri, storage)
        for _ in range(2):  # the second pass hits the block cache where there is one
            seen = [
                i
                for i, data in rr.iter_ranges(offsets, lengths)
                if data == blob[offsets[i] : offsets[i] + lengths[i]]
            ]
            assert sorted(seen) == list(range(len(offsets))), f"{name}: each range once, with its bytes"


@pytest.mark.parametrize("config", ["default", "exact", "block cache"])
def test_regions_decode_the_same_as_local(uploaded, s3_storage, config):
    storage = s3_storage.model_copy(update=CONFIGS[config])
    for path, uri in uploaded.values():
        local = open_slide(path, mpp=0.5, cache=False, tile_cache=0)
        remote = open_slide(uri, storage, mpp=0.5, cache=False, tile_cache=0)
        w, h = local.dimensions
        rng = np.random.default_rng(3)
        coords = [(int(rng.integers(-100, w - 100)), int(rng.integers(-100, h - 100))) for _ in range(24)]
        coords += coords[:3]  # regions read twice in one batch share their tiles
        for size, at in ((256, 0.5), (224, 1.0)):
            got = remote.read_batch(coords, size, at)
            want = local.read_batch(coords, size, at)
            assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
        assert np.array_equal(remote.read_region(500, 700, 0, 300), local.read_region(500, 700, 0, 300))


def test_batches_read_from_many_threads_and_through_the_tile_cache_match_local(uploaded, s3_storage):
    from concurrent.futures import ThreadPoolExecutor

    path, uri = uploaded[SLIDES[0]]
    local = open_slide(path, mpp=0.5, cache=False, tile_cache=0)
    remote = open_slide(uri, s3_storage, mpp=0.5, cache=False, tile_cache=256)  # shared by the threads
    w, h = local.dimensions
    batches = [
        [(int(x), int(y)) for x, y in np.random.default_rng(seed).integers(0, (w - 300, h - 300), (12, 2))]
        for seed in range(8)
    ]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda coords: remote.read_batch(coords, 256, 0.5), batches + batches))
    for coords, tiles in zip(batches + batches, got, strict=True):
        want = local.read_batch(coords, 256, 0.5)
        assert all(np.array_equal(a, b) for a, b in zip(tiles, want, strict=True))
    before = remote.bytes_read
    again = remote.read_batch(batches[-1], 256, 0.5)  # every tile is in the tile cache by now
    assert remote.bytes_read == before
    assert all(np.array_equal(a, b) for a, b in zip(again, got[-1], strict=True))


def test_a_local_batch_reads_and_decodes_each_stored_tile_once(uploaded):
    """A batch's regions share their stored tiles on local disk too: each is read (and decoded)
    once a batch, with the tile cache off, and the pixels are the per-region reads'."""
    path, _ = uploaded[SLIDES[0]]
    slide = open_slide(path, mpp=0.5, cache=False, tile_cache=0)
    w, h = slide.dimensions
    rng = np.random.default_rng(3)
    coords = [(int(x), int(y)) for x, y in rng.integers(0, (w // 4, h // 4), (24, 2))]  # they overlap
    before = slide.bytes_read
    alone = [slide.read(x, y, 256, 0.5) for x, y in coords]
    per_region = slide.bytes_read - before
    before = slide.bytes_read
    batch = slide.read_batch(coords, 256, 0.5)
    batched = slide.bytes_read - before
    assert all(np.array_equal(a, b) for a, b in zip(batch, alone, strict=True))
    assert batched < per_region / 2
    before = slide.bytes_read
    slide.read(*coords[0], 256, 0.5)
    one = slide.bytes_read - before
    before = slide.bytes_read
    slide.read_batch([coords[0]] * 8, 256, 0.5)  # the same region 8 times: its tiles once
    assert slide.bytes_read - before == one


def test_merging_cuts_the_number_of_gets(uploaded, s3_storage, requests_of):
    path, uri = uploaded[SLIDES[1]]
    offsets, lengths = shuffled(path, 150, seed=1)
    counts = {}
    for gap in (0, s3_storage.coalesce_gap):
        storage = s3_storage.model_copy(update={"coalesce_gap": gap})
        requests = requests_of(storage)
        rr = reader(uri, storage)
        data = rr.read_ranges(offsets, lengths)
        counts[gap] = requests.count
        assert counts[gap] == len(coalesce(offsets, lengths, gap, storage.max_request_bytes))
        assert counts[gap] == rr.counter.requests, "one GET per planned request, none retried"
        assert data == reader(str(path), storage).read_ranges(offsets, lengths)
    assert counts[s3_storage.coalesce_gap] * 5 <= counts[0], counts


def test_requests_go_out_in_the_order_the_ranges_are_listed(uploaded, s3_storage, requests_of):
    path, uri = uploaded[SLIDES[1]]
    offsets, lengths = shuffled(path, 40, seed=2)
    storage = s3_storage.model_copy(update={"coalesce_gap": 0, "read_concurrency": 1})
    requests = requests_of(storage)
    reader(uri, storage).read_ranges(offsets, lengths)
    firsts = [min(i for i, off in enumerate(offsets) if start <= off < end) for start, end in requests.ranges]
    assert firsts == sorted(firsts), "the ranges a caller needs first are asked for first"


def test_requests_are_cut_at_max_request_bytes():
    offsets, lengths = [0, 100, 200, 300, 5000], [100, 100, 100, 100, 9000]
    assert coalesce(offsets, lengths, 0, max_span=250) == [
        (0, 200, [0, 1]),
        (200, 400, [2, 3]),
        (5000, 14000, [4]),
    ]
    assert coalesce(offsets, lengths, 10_000, max_span=0) == [(0, 14000, [0, 1, 2, 3, 4])]


def test_connections_are_kept_alive(uploaded, s3_storage, requests_of):
    path, uri = uploaded[SLIDES[0]]
    storage = s3_storage.model_copy(update={"coalesce_gap": 0, "read_concurrency": 3})
    requests = requests_of(storage)
    rr = reader(uri, storage)
    for seed in range(4):
        rr.read_ranges(*shuffled(path, 60, seed))
    assert requests.count >= 100 and requests.pool.opened <= 3, (requests.count, requests.pool.opened)


def test_the_block_cache_stays_within_its_bound_and_serves_repeats(uploaded, s3_storage, requests_of):
    path, uri = uploaded[SLIDES[1]]
    blob = path.read_bytes()
    bound, block = 5 * 16384 + 100, 16384
    storage = s3_storage.model_copy(update={"block_cache_bytes": bound, "block_cache_block": block})
    cache = block_cache(storage)
    cache.clear()
    requests = requests_of(storage)
    wrong: list[str] = []

    def read(rr: RangeReader, offsets: list[int], lengths: list[int]) -> None:
        got = rr.read_ranges(offsets, lengths)
        if got != [blob[o : o + n] for o, n in zip(offsets, lengths, strict=True)]:
            wrong.append("bytes differ")
        if not (cache.nbytes <= bound and len(cache) <= 5):
            wrong.append(f"{cache.nbytes} bytes in {len(cache)} blocks")

    threads = [
        threading.Thread(target=read, args=(reader(uri, storage), *shuffled(path, 30, seed)))
        for seed in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong and 0 < cache.nbytes <= bound, wrong
    read(reader(uri, storage), *shuffled(path, 200, 9))  # far more than fits
    assert not wrong and 0 < cache.nbytes <= bound, wrong
    before = requests.count
    read(reader(uri, storage), [block * 3 + 10], [1000])
    read(reader(uri, storage), [block * 3 + 2000], [3000])  # another handle, the same block
    assert requests.count == before + 1, "the second read of a cached block sends nothing"


def test_readers_of_a_block_in_flight_wait_for_one_request(uploaded, s3_storage, requests_of, store):
    path, uri = uploaded[SLIDES[0]]
    blob = path.read_bytes()
    storage = s3_storage.model_copy(update={"block_cache_bytes": 2**20, "block_cache_block": 65536})
    cache = block_cache(storage)
    cache.clear()
    readers = [reader(uri, storage) for _ in range(8)]
    for rr in readers:
        rr.read_ranges([0], [8])  # each handle knows the object (size, tag) and has its URL
    requests = requests_of(storage)
    waits = cache.stats["waits"]
    results: list[bytes] = []
    store.pause()  # the first reader's request hangs, so the other seven find it in flight
    try:
        threads = [
            threading.Thread(target=lambda r=rr: results.append(r.read_ranges([70000], [5000])[0]))
            for rr in readers
        ]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while cache.stats["waits"] < waits + 7 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        store.resume()
    for t in threads:
        t.join(30)
    assert cache.stats["waits"] == waits + 7
    assert requests.count == 1, requests.ranges
    assert results == [blob[70000:75000]] * 8


def test_a_transient_failure_in_the_middle_of_merged_reads_is_retried(
    uploaded, s3_storage, requests_of, store
):
    path, uri = uploaded[SLIDES[1]]
    fast = s3_storage.model_copy(
        update={
            "read_concurrency": 2,
            "coalesce_gap": 4096,
            "read_timeout_s": 1.0,
            "retries": 4,
            "retry_backoff_s": 0.2,
            "deadline_s": 8.0,
        }
    )
    offsets, lengths = shuffled(path, 80, seed=4)
    want = reader(str(path), fast).read_ranges(offsets, lengths)
    planned = len(coalesce(offsets, lengths, fast.coalesce_gap, fast.max_request_bytes))
    assert planned >= 10
    requests = requests_of(fast)

    def hang_once(n: int) -> None:
        if n == 4:  # three requests answered, the fourth meets a frozen endpoint
            store.pause()
            threading.Timer(1.5, store.resume).start()

    for config in ({}, {"block_cache_bytes": 2**22}):
        storage = fast.model_copy(update=config)
        if storage.block_cache_bytes:
            block_cache(storage).clear()
        rr = reader(uri, storage)
        rr.read_ranges([0], [8])  # the object's size and tag, and a URL, before the fault
        answered = rr.counter.requests
        requests.ranges.clear()
        requests.before_send = hang_once
        t0 = time.monotonic()
        got = rr.read_ranges(offsets, lengths)
        took = time.monotonic() - t0
        requests.before_send = None
        assert got == want
        answered = rr.counter.requests - answered
        assert answered >= 10 and requests.count > answered, "the requests that timed out went again"
        assert 1.0 < took < storage.deadline_s, took


def test_a_dead_endpoint_fails_cached_reads_and_their_waiters_within_the_deadline(
    uploaded, s3_storage, store
):
    path, uri = uploaded[SLIDES[0]]
    storage = s3_storage.model_copy(
        update={
            "block_cache_bytes": 2**20,
            "read_timeout_s": 0.5,
            "retries": 2,
            "retry_backoff_s": 0.1,
            "deadline_s": 3.0,
        }
    )
    block_cache(storage).clear()
    readers = [reader(uri, storage) for _ in range(3)]
    for rr in readers:
        rr.read_ranges([0], [8])
    errors: list[BaseException] = []

    def read(rr: RangeReader) -> None:
        try:
            rr.read_ranges([300_000], [100])
        except SlideUnavailableError as exc:
            errors.append(exc)

    store.pause()
    t0 = time.monotonic()
    threads = [threading.Thread(target=read, args=(rr,)) for rr in readers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    took = time.monotonic() - t0
    assert len(errors) == 3 and all(uri in str(e) for e in errors), errors
    assert took < storage.deadline_s + 2.0, took


def test_block_cache_claims_settle_for_waiters():
    cache = BlockCache(max_bytes=10)
    hits, waits, mine = cache.claim(["a", "b"])
    assert (hits, waits, mine) == ({}, {}, ["a", "b"])
    _, waits, mine = cache.claim(["a", "b", "c"])
    assert set(waits) == {"a", "b"} and mine == ["c"]
    cache.settle("a", b"12345")
    cache.settle("b", None)  # its reader gave up: a waiter asks itself
    cache.settle("c", None, OSError("refused"))
    assert waits["a"].result() == b"12345"
    with pytest.raises(AbandonedFetch):
        waits["b"].result()
    hits, _, mine = cache.claim(["a", "b", "c"])
    assert hits == {"a": b"12345"} and mine == ["b", "c"]
    cache.settle("b", b"67890")
    cache.settle("c", b"x" * 11)  # larger than the whole cache: handed on, never kept
    assert cache.nbytes == 10 and len(cache) == 2
    cache.claim(["d"])
    cache.settle("d", b"zz")
    assert cache.nbytes == 7 and cache.claim(["a"])[0] == {}, "the least recently used went first"


class _ClosingHandler(http.server.BaseHTTPRequestHandler):
    """Answers a keep-alive GET, then drops the connection without saying so (as idle timeouts do)."""

    protocol_version = "HTTP/1.1"
    body = bytes(range(256)) * 64

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        start, end = (int(v) for v in self.headers["Range"].removeprefix("bytes=").split("-"))
        data = self.body[start : end + 1]
        self.send_response(206)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.close_connection = True


@pytest.mark.parametrize("noticed", [True, False], ids=["noticed while idle", "noticed on sending"])
def test_a_kept_alive_connection_the_server_dropped_is_replaced(noticed, monkeypatch):
    from pathray.wsi.backends import connections

    if not noticed:  # as if the server's close arrived just after the idle check
        monkeypatch.setattr(connections, "_dropped", lambda sock: False)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ClosingHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/object"
        pool = connections.ConnectionPool(4)
        for start in (0, 1000, 5000):
            status, data = pool.get(url, {"Range": f"bytes={start}-{start + 99}"}, 2.0, 2.0)
            assert (status, data) == (206, _ClosingHandler.body[start : start + 100])
            time.sleep(0.05)  # the server has closed its end by now
        assert pool.opened == 3, "a new connection for each request, none of them failed or retried"
        pool.close()
    finally:
        server.shutdown()
        server.server_close()


def test_counting_file_reads_into_numpy_buffers() -> None:
    """tifffile reads strips straight into numpy arrays: ``readinto`` fills any writable buffer."""
    from pathray.wsi.backends.ranges import CountingFile

    f = CountingFile(io.BytesIO(bytes(range(100))), ByteCounter())
    out = np.zeros(5, np.uint16)
    assert f.readinto(out) == 10
    assert out.tobytes() == bytes(range(10))
    tail = bytearray(4)
    assert f.readinto(tail) == 4 and bytes(tail) == bytes(range(10, 14))


@pytest.mark.parametrize("backend", ["tiffslide", "tifffile"])
def test_an_outage_while_the_header_is_read_is_an_outage_not_a_bad_slide(
    uploaded, s3_storage, requests_of, store, backend
):
    """The endpoint answers the object's size, then freezes before the first header read: the
    reader's failure must stay a retryable ``SlideUnavailableError``, not become a format error
    that would mark a good slide as broken for the rest of a run."""
    _, uri = uploaded[SLIDES[0]]
    storage = s3_storage.model_copy(
        update={"read_timeout_s": 0.5, "retries": 1, "retry_backoff_s": 0.1, "deadline_s": 2.0}
    )
    requests = requests_of(storage)
    requests.before_send = lambda n: store.pause() if n == 1 else None
    with pytest.raises(SlideUnavailableError) as caught:
        open_slide(uri, storage, backend=backend)
    assert uri in str(caught.value) and "cannot read it" not in str(caught.value)
    store.resume()
    requests.before_send = None
    with open_slide(uri, storage, backend=backend) as slide:  # the same slide, once it answers
        assert slide.dimensions[0] > 0
