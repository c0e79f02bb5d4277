"""Storage that fails loudly and briefly, on the real SeaweedFS endpoint (127.0.0.1).

The endpoint hangs (SIGSTOP), dies (SIGKILL) and comes back (same port, credentials and data):
reads succeed when it is back within the retry window, fail with a SlideError naming the slide
within the deadline otherwise, and no message, log line or traceback carries a signed URL or a
credential.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import pytest

from pathray.storage import (
    StorageConfig,
    StorageUnavailableError,
    is_transient,
    parse_uri,
    read_bytes,
    redact,
    stat,
)
from pathray.wsi.backends import SlideError, SlideUnavailableError, open_slide

pytestmark = [pytest.mark.s3, pytest.mark.slow]

DEADLINE = 5.0
SLACK = 2.0  # scheduling on 2 busy cores; a hung read without a deadline takes 75 s and more


@pytest.fixture(scope="module")
def slide_uri(object_store, testdata) -> str:
    return object_store.upload_file(
        testdata / "aperio" / "CMU-1-Small-Region.svs", object_store.url_for("faults/cmu.svs")
    )


@pytest.fixture
def fast(s3_storage) -> StorageConfig:
    """Short timeouts so each fault plays out in seconds."""
    return s3_storage.model_copy(
        update={
            "connect_timeout_s": 1.0,
            "read_timeout_s": 1.0,
            "retries": 4,
            "retry_backoff_s": 0.2,
            "deadline_s": DEADLINE,
        }
    )


@pytest.fixture
def store(object_store):
    """The session's endpoint, running and answering again after each test whatever it did."""
    try:
        yield object_store
    finally:
        object_store.resume()
        if not object_store.running:
            object_store.restart()


COORDS = [(100 + 300 * i, 1200) for i in range(6)]


def fresh(uri: str, storage: StorageConfig):
    return open_slide(uri, storage, cache=False, tile_cache=0)


def test_redact_removes_signed_queries_and_credentials():
    v2 = "http://127.0.0.1:8333/b/k.svs?AWSAccessKeyId=AKIA123&Signature=abc%2Fdef&Expires=17"
    v4 = (
        "https://s3.x/b/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA9%2F2026%2Fs3"
        "&X-Amz-Date=20261205T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host"
        "&X-Amz-Security-Token=FQoG&X-Amz-Signature=0123abcd"
    )
    raw = (
        f"HTTPConnectionPool(host='127.0.0.1', port=8333): Max retries exceeded with url: "
        f"/b/k.svs?AWSAccessKeyId=AKIA123&Signature=abc (Caused by ...) ; {v2} ; {v4}"
    )
    header = "{'Authorization': b'AWS4-HMAC-SHA256 Credential=AKIA9/2026, Signature=ffee'}"
    for text in (v2, v4, raw, header):
        clean = redact(text)
        assert "AKIA" not in clean and "abc" not in clean and "0123abcd" not in clean, clean
        assert "FQoG" not in clean and "ffee" not in clean, clean
    assert redact(v2).startswith("http://127.0.0.1:8333/b/k.svs?<redacted>")
    assert redact("cannot read s3://b/k.svs: HTTP 500") == "cannot read s3://b/k.svs: HTTP 500"


def test_storage_errors_cross_processes_whole():
    import pickle

    for error in (SlideUnavailableError("s3://b/k.svs", "no answer"), StorageUnavailableError("s3://b", "x")):
        back = pickle.loads(pickle.dumps(error))
        assert type(back) is type(error) and (back.uri, back.cause, str(back)) == (
            error.uri,
            error.cause,
            str(error),
        )


def test_transient_failures_are_told_from_answers():
    from botocore.exceptions import EndpointConnectionError, ReadTimeoutError

    assert is_transient(ReadTimeoutError(endpoint_url="http://127.0.0.1:1"))
    assert is_transient(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert is_transient(ConnectionRefusedError(111, "refused"))
    assert is_transient(OSError(5, "503 Service Unavailable"))
    assert not is_transient(FileNotFoundError("b/k"))
    assert not is_transient(PermissionError("AccessDenied"))


def test_a_hang_shorter_than_the_retry_window_is_waited_out(store, slide_uri, fast, testdata):
    local = fresh(testdata / "aperio" / "CMU-1-Small-Region.svs", StorageConfig())
    slide = fresh(slide_uri, fast)
    store.pause()
    threading.Timer(2.0, store.resume).start()
    t0 = time.monotonic()
    tiles = slide.read_batch(COORDS, 224, 0.5)
    took = time.monotonic() - t0
    assert 1.8 < took < DEADLINE, took
    for a, b in zip(tiles, local.read_batch(COORDS, 224, 0.5), strict=True):
        assert np.array_equal(a, b)


def test_a_longer_hang_fails_within_the_deadline_naming_the_slide(store, slide_uri, fast):
    slide = fresh(slide_uri, fast)
    store.pause()
    t0 = time.monotonic()
    with pytest.raises(SlideUnavailableError) as info:
        slide.read_batch([(x, y + 300) for x, y in COORDS], 224, 0.5)
    took = time.monotonic() - t0
    assert DEADLINE - 1.5 < took < DEADLINE + SLACK, took
    assert str(info.value).startswith(f"storage unavailable for {slide_uri}: no answer after"), info.value
    assert "Timeout" in str(info.value)
    t0 = time.monotonic()
    with pytest.raises(StorageUnavailableError):  # whole-object reads (manifests, configs) too
        read_bytes(slide_uri, fast)
    assert time.monotonic() - t0 < DEADLINE + SLACK


def test_a_killed_endpoint_fails_clearly_and_a_restarted_one_serves_again(
    store, slide_uri, fast, caplog, assert_no_secrets
):
    caplog.set_level(logging.DEBUG)  # urllib3 logs request lines, query strings included, at DEBUG
    slide = fresh(slide_uri, fast)  # its header is read over presigned URLs
    store.kill()
    errors: list[BaseException] = []
    for attempt in (
        lambda: slide.read_batch([(x, y + 600) for x, y in COORDS], 224, 0.5),
        lambda: fresh(slide_uri, fast),
        lambda: stat(parse_uri(slide_uri), fast),
    ):
        t0 = time.monotonic()
        with pytest.raises(SlideError if len(errors) < 2 else StorageUnavailableError) as info:
            attempt()
        assert time.monotonic() - t0 < DEADLINE + SLACK
        errors.append(info.value)
    assert isinstance(errors[0], SlideUnavailableError) and isinstance(errors[1], SlideUnavailableError)
    assert "Connection refused" in str(errors[0]) or "connect" in str(errors[0]).lower(), errors[0]
    reported = [caplog.text] + [m for e in errors for m in (str(e), repr(e), *traceback.format_exception(e))]
    assert any("?<redacted>" in r.getMessage() for r in caplog.records), "no request line was logged"
    assert_no_secrets(*reported)
    store.restart()
    tiles = slide.read_batch([(x, y + 600) for x, y in COORDS], 224, 0.5)  # the same handle goes on
    assert len(tiles) == len(COORDS) and all(t.shape == (224, 224, 3) for t in tiles)


def test_slides_info_against_a_stopped_endpoint_says_one_line_within_the_deadline(
    store, slide_uri, fast, assert_no_secrets
):
    key_env, secret_env = store.env_names()
    sets = [
        f"storage.endpoint_url={fast.endpoint_url}",
        f"storage.key_env={key_env}",
        f"storage.secret_env={secret_env}",
        "storage.read_timeout_s=1",
        "storage.connect_timeout_s=1",
        f"storage.deadline_s={DEADLINE}",
    ]
    cmd = [str(Path(sys.executable).parent / "pathray"), "slides", "info", slide_uri]
    for item in sets:
        cmd += ["--set", item]
    store.pause()
    t0 = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=os.environ.copy())
    took = time.monotonic() - t0
    assert done.returncode == 2, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: storage unavailable for {slide_uri}"), done.stderr
    assert_no_secrets(done.stderr, done.stdout)
    assert took < DEADLINE + 15, took  # the interpreter's start-up and imports, then the deadline
