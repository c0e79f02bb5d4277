"""`pathray serve` refuses bad configs with one line and exit code 2, before starting anything."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PATHRAY = [sys.executable, "-m", "pathray.cli"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PATHRAY, *args], capture_output=True, text=True, timeout=120)


def test_missing_config_file(tmp_path):
    out = run("serve", str(tmp_path / "nope.yaml"))
    assert out.returncode == 2
    assert out.stderr.strip() == f"error: no serve config file at {tmp_path / 'nope.yaml'}"


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
