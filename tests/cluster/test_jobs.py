"""What `pathray submit` sends with a job: the config (an experiment's base project too), no credentials."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pathray.cluster.jobs import BASE_NAME, CONFIG_NAME, ClusterError, Submission, prepare, refuse_credentials

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def pathray(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "pathray.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_an_experiment_job_carries_its_base_project(tmp_path):
    sub = Submission(
        CONFIGS / "experiment-engines.yaml",
        "experiment",
        ["experiment.fractions=[0.5]", f"experiment.base={BASE_NAME}"],
        files={BASE_NAME: CONFIGS / "gleason-foundation.yaml"},
    )
    entrypoint, runtime_env = prepare(sub, tmp_path)
    workdir = Path(runtime_env["working_dir"])
    assert sorted(p.name for p in workdir.iterdir()) == sorted([CONFIG_NAME, BASE_NAME])
    assert shlex.split(entrypoint) == [
        "pathray", "experiment", CONFIG_NAME,
        "--set", "experiment.fractions=[0.5]", "--set", f"experiment.base={BASE_NAME}",
    ]  # fmt: skip
    # on the cluster the staged files load as the experiment they were here
    from pathray.training.experiment import cell_configs, load_experiment

    exp = load_experiment(
        workdir / CONFIG_NAME, ["experiment.fractions=[0.5]", f"experiment.base={BASE_NAME}"]
    )
    assert [c.engine.name for c in cell_configs(exp, tmp_path)] == ["foundation", "cnn"]


def test_credentials_never_travel_with_a_job():
    refuse_credentials(["storage.endpoint_url=http://x", "train.steps=3"], {"OMP_NUM_THREADS": "1"})
    for override in ("storage.key=AKIA", "storage.secret=abc"):
        with pytest.raises(ClusterError, match="credentials must not travel with a job"):
            refuse_credentials([override], {})
    for name in ("AWS_SECRET_ACCESS_KEY", "MY_SECRET"):
        with pytest.raises(ClusterError, match=f"--env {name}"):
            refuse_credentials([], {name: "x"}, ("MY_KEY", "MY_SECRET"))


def test_submit_checks_an_experiment_as_an_experiment_before_it_calls_the_cluster(tmp_path):
    # A closed port: whatever fails, fails at the cluster, after the experiment (every cell) was checked.
    out = pathray("submit", str(CONFIGS / "experiment-engines.yaml"), "--command", "experiment")
    assert out.returncode == 2 and "no cluster address" in out.stderr, out.stderr
    bad = tmp_path / "bad.yaml"
    exp = yaml.safe_load((CONFIGS / "experiment-engines.yaml").read_text())
    exp["experiment"]["base"] = str(CONFIGS / "gleason-foundation.yaml")
    exp["experiment"]["set"] = ["train.stpes=3"]
    bad.write_text(yaml.safe_dump(exp))
    out = pathray("submit", str(bad), "--command", "experiment", "--address", "http://127.0.0.1:1")
    assert out.returncode == 2 and "stpes" in out.stderr and "Traceback" not in out.stderr, out.stderr
    secret = ["--set", "storage.secret=hunter2", "--address", "http://127.0.0.1:1"]
    out = pathray("submit", str(CONFIGS / "gleason-cnn.yaml"), *secret)
    assert out.returncode == 2 and "credentials must not travel with a job" in out.stderr, out.stderr
