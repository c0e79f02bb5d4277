"""The storage layer: joins, whole-object reads and writes (disk and SeaweedFS), typed errors, credentials
that never leave the process that read them, and the one LRU every cache uses."""

from __future__ import annotations

import pickle
import threading

import pytest
import yaml

from pathray.lru import LruCache
from pathray.storage import (
    AccessDeniedError,
    ObjectNotFoundError,
    StorageConfig,
    UnsupportedSchemeError,
    join_uri,
    read_bytes,
    write_bytes,
    write_text,
)


def test_join_uri_for_folders_and_bucket_prefixes():
    assert join_uri("s3://b/runs/", "a", "/m.json") == "s3://b/runs/a/m.json"
    assert join_uri("/data/runs", "a/") == "/data/runs/a"


def test_whole_objects_on_local_disk(tmp_path):
    uri = str(tmp_path / "deep" / "er" / "a.json")
    assert write_text(uri, "{}") == uri  # parent folders are made
    assert read_bytes(uri) == b"{}"
    write_bytes(uri, b"second")  # replaces
    assert read_bytes(tmp_path.joinpath("deep/er/a.json").as_uri()) == b"second"
    with pytest.raises(ObjectNotFoundError, match="nope"):
        read_bytes(str(tmp_path / "nope"))
    with pytest.raises(UnsupportedSchemeError, match="ftp"):
        read_bytes("ftp://host/x")


@pytest.mark.s3
def test_whole_objects_in_a_bucket_and_refusals_are_typed(object_store, s3_storage):
    uri = object_store.url_for("storage-tests/a/b.txt")
    write_bytes(uri, b"hello", s3_storage)
    assert read_bytes(uri, s3_storage) == b"hello"
    limited = object_store.storage_config("limited")  # may read and list, not write
    assert read_bytes(uri, limited) == b"hello"
    with pytest.raises(AccessDeniedError, match="storage-tests/a/c.txt"):
        write_bytes(object_store.url_for("storage-tests/a/c.txt"), b"x", limited)
    with pytest.raises(ObjectNotFoundError):
        read_bytes(object_store.url_for("storage-tests/missing"), s3_storage)


def test_credentials_are_never_dumped_and_never_pickled(monkeypatch):
    storage = StorageConfig(endpoint_url="http://127.0.0.1:1", key="AKIDTEST", secret="s3cr3t-value")
    assert storage.credentials() == ("AKIDTEST", "s3cr3t-value")
    dumped = yaml.safe_dump(storage.model_dump(mode="json")) + storage.model_dump_json() + repr(storage)
    assert "AKIDTEST" not in dumped and "s3cr3t-value" not in dumped
    # another process (a Ray worker) gets the config without them and reads the named variables
    shipped = pickle.loads(pickle.dumps(storage))
    assert shipped.key is None and shipped.secret is None and b"s3cr3t" not in pickle.dumps(storage)
    assert shipped.credentials() is None  # the AWS variables: left to the SDK's own chain
    named = storage.model_copy(update={"key_env": "PR_TEST_KEY", "secret_env": "PR_TEST_SECRET"})
    monkeypatch.delenv("PR_TEST_KEY", raising=False)
    monkeypatch.delenv("PR_TEST_SECRET", raising=False)
    assert pickle.loads(pickle.dumps(named)).credentials() is None
    named.export_env()  # an entry point does this before it starts a local Ray
    assert pickle.loads(pickle.dumps(named)).credentials() == ("AKIDTEST", "s3cr3t-value")
    assert StorageConfig(key="", secret="").credentials() is None  # ${AWS_KEY:-} left empty: no key


def test_handles_of_different_credentials_are_different():
    a = StorageConfig(key="key-a", secret="pw-8c1f")
    assert a.identity() != StorageConfig(key="key-b", secret="pw-8c1f").identity()
    assert a.identity() == StorageConfig(key="key-a", secret="pw-8c1f").identity()
    assert "pw-8c1f" not in a.identity() and "key-a" not in a.identity()


def test_lru_keeps_the_most_recent_and_one_value_per_key():
    cache: LruCache[str, int] = LruCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # a is now the most recent
    cache.put("c", 3)
    assert "b" not in cache and cache.get("a") == 1 and cache.get("c") == 3 and len(cache) == 2
    assert cache.put("c", 4) == 3  # a value stored meanwhile wins: every caller sees one object
    made = []
    assert cache.get_or_make("d", lambda: made.append(1) or 5) == 5
    assert cache.get_or_make("d", lambda: made.append(1) or 6) == 5 and made == [1]
    assert LruCache(0).put("x", 1) == 1 and len(LruCache(0)) == 0


def test_lru_from_many_threads_keeps_its_bound():
    cache: LruCache[int, int] = LruCache(8)

    def work(offset: int) -> None:
        for i in range(500):
            cache.get_or_make((i + offset) % 20, lambda i=i: i)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(cache) == 8
