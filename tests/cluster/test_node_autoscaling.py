"""Node autoscaling with Ray's fake multi-node provider: a pathray training job that wants a GPU
worker-group resource makes the autoscaler add a node; the node goes away after idling.

This is the provider ``ray.cluster_utils.AutoscalingCluster`` drives. The class itself is not
usable here: it reads ``autoscaler/_private/fake_multi_node/example.yaml``, which the PyPI wheel
does not ship, and its start/shutdown run ``ray stop --force``, which would stop every Ray on
the machine (the test session's own included). So the test writes the cluster config the class
would generate and starts the head with ``--autoscaling-config`` in a session of its own.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.e2e]

BIN = Path(sys.executable).parent
GROUP_RESOURCE = "pathray_gpu_group"


def fake_cluster_config(idle_minutes: float, gcs_address: str) -> dict:
    """What AutoscalingCluster generates: a head that takes no group work, one worker node type."""
    empty_lists = ("initialization_commands", "setup_commands", "head_setup_commands")
    empty_lists += ("worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
    return {
        "cluster_name": "pathray-fake",
        "max_workers": 2,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_minutes,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,  # the head's port is not Ray's default 6379
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 2}, "node_config": {}, "max_workers": 0},
            "gpu_group": {
                "resources": {"CPU": 1, GROUP_RESOURCE: 1},
                "node_config": {},
                "min_workers": 0,
                "max_workers": 1,
            },
        },
        "head_node_type": "ray.head.default",
        "auth": {},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        **{k: [] for k in empty_lists},
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_marked(marker: str) -> None:
    """Kill every process whose environment names ``marker`` (the cluster's own TMPDIR)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if marker.encode() in Path(f"/proc/{entry}/environ").read_bytes():
                os.kill(int(entry), signal.SIGKILL)
        except OSError:
            pass


DRIVER = textwrap.dedent(
    """
    import json, sys, threading, time
    import ray
    from pathray.config import load_config
    from pathray.training.trainer import run_training

    ray.init(address=sys.argv[1])
    alive = lambda: sum(1 for n in ray.nodes() if n["Alive"])
    seen = {"before": alive(), "most": 0, "group_nodes": 0}
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            nodes = [n for n in ray.nodes() if n["Alive"]]
            seen["most"] = max(seen["most"], len(nodes))
            seen["group_nodes"] = max(
                seen["group_nodes"], sum(1 for n in nodes if n["Resources"].get(sys.argv[3], 0) > 0)
            )
            stop.wait(0.5)

    threading.Thread(target=watch, daemon=True).start()
    cfg = load_config(sys.argv[2], sys.argv[4:])
    result = run_training(cfg)
    stop.set()
    seen["steps"] = result.metrics.get("step")
    t0 = time.time()
    while alive() > 1 and time.time() - t0 < 120:
        time.sleep(1)
    seen["after_idle"] = alive()
    seen["removed_after_s"] = round(time.time() - t0, 1)
    print("RESULT " + json.dumps(seen), flush=True)
    """
)


def test_a_group_resource_demand_adds_a_node_that_idles_away(tmp_path):
    from pathray.datasets.manifest import synthetic_manifest, write_manifest
    from pathray.wsi.synth import SynthConfig, write_synthetic_slides

    tmp = tempfile.mkdtemp(prefix="pras", dir="/tmp")
    port = free_port()
    config_file = Path(tmp) / "cluster.yaml"
    config_file.write_text(yaml.safe_dump(fake_cluster_config(0.1, f"127.0.0.1:{port}")))
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "TMPDIR": tmp,
        "RAY_FAKE_CLUSTER": "1",
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",  # a throwaway cluster of the test's own
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # every fake node on 127.0.0.1
    }
    try:
        subprocess.run(
            [str(BIN / "ray"), "start", "--head", f"--port={port}", "--num-cpus=2",
             "--node-ip-address=127.0.0.1", "--include-dashboard=false", f"--temp-dir={tmp}/ray",
             f"--autoscaling-config={config_file}", "--disable-usage-stats"],
            env=env, check=True, capture_output=True, timeout=180,
        )  # fmt: skip
        slides = write_synthetic_slides(tmp_path / "slides", n=2, seed=2, config=SynthConfig(size=3072))
        manifest = write_manifest(synthetic_manifest(slides), tmp_path / "manifest.parquet")
        sets = [
            f"data.manifest={manifest}",
            "data.split=null",
            "engine.name=debug_cnn",
            "engine.model=null",
            "scale.workers=1",
            "scale.cpus_per_worker=0.5",
            f"scale.resources_per_worker={{{GROUP_RESOURCE}: 1}}",
            "data.stream.readers=1",
            "data.stream.sampler.tiles_per_slide=16",
            "train.batch_size=4",
            "train.steps=2",
            "train.eval_split=null",
            "run.checkpoint_every=2",
            "run.name=autoscaled",
            f"run.storage_path={tmp_path / 'runs'}",
        ]
        config = Path(__file__).resolve().parents[2] / "configs" / "gleason-cnn.yaml"
        out = subprocess.run(
            [sys.executable, "-c", DRIVER, f"127.0.0.1:{port}", str(config), GROUP_RESOURCE, *sets],
            env=env, capture_output=True, text=True, timeout=480,
        )  # fmt: skip
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        seen = json.loads(out.stdout.split("RESULT ", 1)[1].splitlines()[0])  # autoscaler events may follow
        assert seen["before"] == 1, seen  # only the head until the job asked for the group
        assert seen["most"] == 2 and seen["group_nodes"] == 1, seen  # the autoscaler added one
        assert seen["steps"] == 2, seen  # ... and the worker trained on it
        assert seen["after_idle"] == 1, seen  # ... and it was removed after idling
    finally:
        kill_marked(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
