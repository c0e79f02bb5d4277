"""Shared fixtures: the SeaweedFS endpoint on 127.0.0.1 and the test slides."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from pathray.cluster.local import LocalObjectStore
    from pathray.storage import StorageConfig

TESTDATA = Path(__file__).resolve().parents[1].parent / "shared" / "testdata" / "slides"


def pytest_configure(config: pytest.Config) -> None:
    """Caches (slide copies, tissue masks) go to a temp dir, not the user's home; Ray inherits it."""
    import os
    import secrets
    import tempfile

    os.environ.setdefault("PATHRAY_CACHE", tempfile.mkdtemp(prefix="pathray-test-cache-"))
    # 2 cores shared with Ray workers and SeaweedFS: one torch thread avoids oversubscription.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # The Serve tests' bearer token, in the environment the local Ray's replicas inherit (a token in
    # a config is never stored with an app: replicas read `serve.security.token_env`).
    os.environ.setdefault("PATHRAY_TEST_SERVE_TOKEN", "test-token-" + secrets.token_hex(8))


@pytest.fixture(scope="session")
def object_store() -> Iterator[LocalObjectStore]:
    """One SeaweedFS for the whole session (~3 s to start); stopped and deleted at the end."""
    from pathray.cluster.local import LocalObjectStore

    store = LocalObjectStore().start()
    try:
        yield store
    finally:
        store.stop()


@pytest.fixture(scope="session")
def s3_storage(object_store: LocalObjectStore) -> StorageConfig:
    """Admin credentials for ``object_store``."""
    return object_store.storage_config()


@pytest.fixture(scope="session")
def testdata() -> Path:
    """The public test slides (/work/shared/testdata/slides, beside the repository)."""
    if not TESTDATA.is_dir():
        pytest.skip(f"test slides not found at {TESTDATA}")
    return TESTDATA


@pytest.fixture(scope="session")
def ray_local(object_store: LocalObjectStore) -> Iterator[None]:
    """One local Ray for the session, on 127.0.0.1, without dashboard or progress bars.

    Started after the object store, whose credentials are in this process's environment by then:
    Ray's workers inherit them there, as they would on a cluster, and no config carries them.
    """
    import ray

    from pathray.cluster.ray_local import ensure_ray

    ensure_ray(num_cpus=4, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture
def own_tmp() -> Iterator[str]:
    """A short TMPDIR for a command under test: its SeaweedFS data and Ray session live under it,
    so processes naming it are the command's own (other Ray instances on the machine are not)."""
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix="prd", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def own_pids(own_tmp: str) -> Callable[[], set[int]]:
    """``own_pids()``: the processes whose command line names ``own_tmp``, i.e. those left behind."""
    import subprocess

    def pids() -> set[int]:
        out = subprocess.run(["pgrep", "-f", own_tmp], capture_output=True, text=True)
        return {int(p) for p in out.stdout.split()}

    return pids


@pytest.fixture(scope="session")
def save_package() -> Callable[..., str]:
    """``save_package(uri, *overrides, storage=None, meta=None)``: a freshly initialised model of a
    project config (default engine debug_cnn) written as a model package; returns ``uri``."""

    def save(
        uri: str, *overrides: str, storage: StorageConfig | None = None, meta: dict | None = None
    ) -> str:
        from pathray.config import load_config
        from pathray.models.package import package_model, save_model_package
        from pathray.models.task_model import build_model

        cfg = load_config(None, ["engine.name=debug_cnn", *overrides])
        model, _ = build_model(cfg.engine, cfg.task)
        sampler = cfg.data.stream.sampler
        package = package_model(model, cfg.engine, cfg.task, sampler.size, sampler.mpps[0], meta)
        return save_model_package(str(uri), package, storage)

    return save


@pytest.fixture(scope="session")
def assert_no_secrets(object_store: LocalObjectStore) -> Callable[..., None]:
    """``assert_no_secrets(*texts, ray_logs=False)``: none of the texts (nor, with ``ray_logs``, any log
    file of this Ray session) holds the endpoint's keys or secrets, a signature or a signed query."""
    import re

    signed = re.compile(
        r"(Signature|AWSAccessKeyId|X-Amz-Credential|X-Amz-Security-Token|Credential)=(?!<redacted>)"
        r"|\?(?!<redacted>)[\w.~%-]+=[^\s]*&",
        re.IGNORECASE,
    )

    def check(*texts: str, ray_logs: bool = False) -> None:
        everything = list(texts)
        if ray_logs:
            import ray

            logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
            everything += [p.read_text(errors="replace") for p in logs.rglob("*") if p.is_file()]
        secrets = [v for name in ("admin", "limited") for v in object_store.credentials(name)]
        for text in everything:
            leaked = [s for s in secrets if s in text]
            assert not leaked, f"a credential in: {text[:2000]}"
            match = signed.search(text)
            assert match is None, (
                f"{match.group(0)!r} in: {text[max(0, match.start() - 300) : match.end() + 300]}"
            )

    return check
