"""`pathray serve`: bad configs get one line and exit code 2 before anything starts; a good one
serves on 127.0.0.1 until SIGTERM or Ctrl-C, then stops quietly and leaves no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

PATHRAY = [sys.executable, "-m", "pathray.cli"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PATHRAY, *args], capture_output=True, text=True, timeout=120)


def test_missing_config_file(tmp_path):
    out = run("serve", str(tmp_path / "nope.yaml"))
    assert out.returncode == 2
    assert out.stderr.strip() == f"error: no config file at {tmp_path / 'nope.yaml'}"


def test_bad_keys_and_bounds_name_the_key(tmp_path):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("serve:\n  http:\n    port: 8000\n")
    out = run("serve", str(cfg), "--set", "serve.model.autoscaling.max_replicas=0")
    assert out.returncode == 2 and "serve.model.autoscaling.max_replicas" in out.stderr
    out = run("serve", str(cfg), "--set", "serve.security.allowed_prefixes=[relative/path]")
    assert out.returncode == 2 and "not a URI" in out.stderr
    Path(cfg).write_text("serve:\n  colour: blue\n")
    out = run("serve", str(cfg))
    assert out.returncode == 2 and "serve.colour" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.ray
@pytest.mark.slow
def test_serve_answers_until_sigterm_then_stops_quietly(tmp_path, own_tmp, own_pids, save_package):
    import httpx
    import yaml

    save_package(tmp_path / "models" / "tiny")
    config = {
        "serve": {
            "models": str(tmp_path / "models"),
            "output": str(tmp_path / "out"),
            "http": {"host": "127.0.0.1", "port": 0},
            "model": {"autoscaling": {"min_replicas": 1, "max_replicas": 1}},
            "security": {"allowed_prefixes": [f"file://{tmp_path}/slides/"]},
        }
    }
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        [*PATHRAY, "serve", str(tmp_path / "serve.yaml")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**env, "TMPDIR": own_tmp, "RAY_TMPDIR": own_tmp, "COLUMNS": "200"},
    )
    lines: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("serving on "):
                ready.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        assert ready.wait(180), "".join(lines)[-3000:]
        url = next(line for line in lines if line.startswith("serving on ")).split()[2]
        assert url.startswith("http://127.0.0.1:")
        assert httpx.get(f"{url}/healthz", timeout=30).status_code == 200
        models = httpx.get(f"{url}/v1/models", timeout=30).json()
        assert "tiny" in str(models), models
        proc.send_signal(signal.SIGTERM)  # as Kubernetes and systemd stop it; Ctrl-C is handled alike
        assert proc.wait(timeout=120) == 0, "".join(lines)[-3000:]
        reader.join(timeout=30)
        out = "".join(lines)
        assert "stopped" in out and "graceful_shutdown failed" not in out, out[-3000:]
        # Ray's own workers notice their raylet is gone within seconds of the command's exit.
        deadline = time.monotonic() + 30
        while own_pids() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not own_pids(), f"pathray serve left processes running: {own_pids()}"
    finally:
        if proc.poll() is None:
            proc.kill()
