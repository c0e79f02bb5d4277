"""Two Ray nodes on loopback addresses (`ray start --head` + `ray start --address`); `pathray submit
--command experiment` runs a grid whose cell trains on 2 workers through the Jobs API, one worker on
each node, with token auth on."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.e2e]

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def agent_ports() -> list[str]:
    """Each node's agents on free ports: the defaults clash with any other Ray on the machine."""
    names = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port")
    return [f"--{name}={free_port()}" for name in (*names, "runtime-env-agent-port")]


def session_pids(sid: int) -> list[int]:
    """Every process of a session: the nodes' ray start, raylet, GCS, dashboard and workers."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    found.append(int(entry))
            except OSError:
                pass
    return found


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[dict[str, str]]:
    """A head and a worker node of their own (own temp dir, ports and sessions), stopped by PID.

    ``ray stop`` would stop every Ray on the machine (the test session's local Ray too), so each
    node runs ``ray start --block`` in a new session and the sessions are killed afterwards.
    """
    tmp = tempfile.mkdtemp(prefix="prmn", dir="/tmp")
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": f"{tmp}/auth_token",
        "TMPDIR": tmp,
    }
    Path(env["RAY_AUTH_TOKEN_PATH"]).write_text("pathray-test-" + os.urandom(16).hex())
    # Ray swaps 127.0.0.1 for the machine's outward address when clusters are enabled; other
    # loopback addresses are kept, so the nodes live on 127.0.0.2 and 127.0.0.3 (both in 127/8).
    port, dash = free_port(), free_port()
    common = ["--num-cpus=2", "--block", "--disable-usage-stats"]
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.2", f"--port={port}",
         "--dashboard-host=127.0.0.2", f"--dashboard-port={dash}", f"--temp-dir={tmp}/ray",
         "--include-dashboard=true", f"--ray-client-server-port={free_port()}", *agent_ports(), *common],
        env=env, start_new_session=True, stdout=open(f"{tmp}/head.log", "w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    address = f"http://127.0.0.2:{dash}"
    procs = [head]
    try:
        _wait_for_dashboard(address, env)
        worker = subprocess.Popen(
            [str(BIN / "ray"), "start", f"--address=127.0.0.2:{port}", "--node-ip-address=127.0.0.3",
             *agent_ports(), *common],
            env=env, start_new_session=True, stdout=open(f"{tmp}/worker.log", "w"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        procs.append(worker)
        yield {"address": address, "gcs": f"127.0.0.2:{port}", "tmp": tmp, **env}
    finally:
        for p in procs:
            for pid in session_pids(p.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        shutil.rmtree(tmp, ignore_errors=True)


def _wait_for_dashboard(address: str, env: dict[str, str], timeout: float = 90) -> None:
    import urllib.error
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{address}/api/version", timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answers (401 without the token): it is up
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"the head's dashboard did not come up at {address}")


def alive_nodes(nodes: dict[str, str]) -> int:
    code = (
        "import ray, sys; ray.init(address=sys.argv[1], _node_ip_address='127.0.0.2'); "
        "print(sum(n['Alive'] for n in ray.nodes()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, nodes["gcs"]], env=nodes, capture_output=True, text=True, timeout=60
    )
    return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else 0


def test_submit_spreads_a_two_worker_experiment_over_two_nodes(two_nodes, tmp_path):
    import pandas as pd
    import yaml

    from pathray.datasets.manifest import synthetic_manifest, write_manifest
    from pathray.wsi.synth import SynthConfig, write_synthetic_slides

    deadline = time.time() + 180  # a node takes 20-60 s to start on a loaded 2-core machine
    while alive_nodes(two_nodes) < 2 and time.time() < deadline:
        time.sleep(2)
    assert alive_nodes(two_nodes) == 2, Path(two_nodes["tmp"], "worker.log").read_text()[-3000:]

    slides = write_synthetic_slides(tmp_path / "slides", n=3, seed=1, config=SynthConfig(size=3072))
    manifest = write_manifest(synthetic_manifest(slides), tmp_path / "manifest.parquet")
    # An experiment file as a user writes one: its base project travels with the job.
    experiment = tmp_path / "experiment.yaml"
    base = Path(__file__).resolve().parents[2] / "configs" / "gleason-cnn.yaml"
    cell = [
        f"data.manifest={manifest}",
        "data.split=null",
        "engine.model=null",
        "scale.cpus_per_worker=0.5",
        "scale.placement_strategy=STRICT_SPREAD",
        "data.stream.readers=1",
        "data.stream.sampler.tiles_per_slide=16",
        "train.batch_size=4",
        "train.steps=3",
        "train.eval_split=null",
        "run.checkpoint_every=3",
    ]
    spec = {"name": "multinode", "base": str(base), "engines": ["debug_cnn"], "fractions": [1.0]}
    spec |= {"workers": [2], "set": cell, "out": str(tmp_path / "exp")}
    experiment.write_text(yaml.safe_dump({"experiment": spec}))
    cmd = [str(BIN / "pathray"), "submit", str(experiment), "--command", "experiment"]
    cmd += ["--address", two_nodes["address"], "--wait"]
    out = subprocess.run(cmd, env=two_nodes, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    job_id = re.search(r"submitted (\S+)", out.stdout).group(1)
    assert f"job {job_id}: SUCCEEDED" in out.stdout
    # Ray Train names every worker's node rank when it starts the group: both nodes ran one.
    ranks = set(re.findall(r"world_rank=\d+, local_rank=\d+, node_rank=(\d+)", out.stdout))
    assert ranks == {"0", "1"}, out.stdout[-4000:]
    table = pd.read_parquet(tmp_path / "exp" / "multinode" / "results.parquet")
    assert list(table.workers) == [2] and list(table.steps) == [3]
    assert (Path(table.run_dir[0]) / "metrics.json").exists()

    status = subprocess.run(
        [str(BIN / "pathray"), "jobs", "status", job_id, "--address", two_nodes["address"]],
        env=two_nodes, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert status.returncode == 0 and '"status": "SUCCEEDED"' in status.stdout


def test_the_jobs_api_refuses_a_client_without_the_token(two_nodes):
    """Token auth stays on: a client with no token is turned away."""
    env = {**two_nodes, "RAY_AUTH_TOKEN_PATH": "/nonexistent", "HOME": two_nodes["tmp"]}
    out = subprocess.run(
        [str(BIN / "pathray"), "jobs", "status", "nope", "--address", two_nodes["address"]],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode != 0
    assert re.search(r"auth|token|401|Unauthorized", out.stdout + out.stderr, re.I), out.stderr[-2000:]
