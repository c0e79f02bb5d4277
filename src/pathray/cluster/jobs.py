"""Ray Jobs: run ``pathray train CONFIG`` (or an experiment) on a cluster through Ray's Jobs API.

pathray submit configs/gleason-foundation.yaml --address http://head:8265 --wait
pathray jobs status|logs|stop JOB_ID --address http://head:8265
ray job submit --address http://head:8265 --working-dir . -- pathray train configs/gleason-cnn.yaml

The config travels in the job's working directory (a copy of ``--working-dir``, or a folder
holding just the config); the cluster's image provides pathray itself. Ray's token auth stays on:
the token is found where Ray looks for it (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``,
``~/.ray/auth_token``) and sent by Ray's own client.
"""

from __future__ import annotations

import os
import shlex
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_NAME = "pathray-job.yaml"
BASE_NAME = "pathray-job-base.yaml"  # an experiment's base project config, beside it
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
AGENT_WAIT_S = 90.0  # a head that just started may not have its job agent up yet


class ClusterError(RuntimeError):
    """The cluster refused or failed a request; the message says what it answered."""


TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass
class Submission:
    """What to run where: a pathray command on a project config, with its runtime environment."""

    config: Path
    command: str = "train"
    overrides: list[str] = field(default_factory=list)
    working_dir: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    pip: list[str] = field(default_factory=list)
    entrypoint_cpus: float | None = None
    submission_id: str | None = None
    files: dict[str, Path] = field(default_factory=dict)  # more files for the working dir, by name


def token_available() -> bool:
    """Whether a Ray auth token is where Ray's own loader looks for one."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    candidates = [Path(path).expanduser()] if path else [Path.home() / ".ray" / "auth_token"]
    return any(p.is_file() and p.read_text().strip() for p in candidates)


def job_client(address: str | None) -> Any:
    """Ray's ``JobSubmissionClient`` for ``address`` (or ``RAY_ADDRESS``), sending the cluster token.

    Ray attaches the token only when token auth is on in the client's environment; a client
    started outside the cluster does not know that, so when a token is available and the mode is
    unset, the mode is set to ``token`` (Ray then reads the token itself).
    """
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ValueError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    if "RAY_AUTH_MODE" not in os.environ and token_available():
        os.environ["RAY_AUTH_MODE"] = "token"
    return JobSubmissionClient(address)


def prepare(sub: Submission, staging: Path) -> tuple[str, dict[str, Any]]:
    """The entrypoint and runtime_env of a submission; the working dir is staged under ``staging``."""
    if not sub.config.is_file():
        raise FileNotFoundError(f"no config file at {sub.config}")
    workdir = staging / "job"
    if sub.working_dir is not None:
        skip = shutil.ignore_patterns(".git", ".venv", "__pycache__", "runs")
        shutil.copytree(sub.working_dir, workdir, ignore=skip)
    else:
        workdir.mkdir(parents=True)
    shutil.copyfile(sub.config, workdir / CONFIG_NAME)
    for name, source in sub.files.items():
        shutil.copyfile(source, workdir / name)
    args = ["pathray", sub.command, CONFIG_NAME, *[a for o in sub.overrides for a in ("--set", o)]]
    runtime_env: dict[str, Any] = {"working_dir": str(workdir)}
    env = {"RAY_USAGE_STATS_ENABLED": "0", **sub.env}
    runtime_env["env_vars"] = env
    if sub.pip:
        runtime_env["pip"] = list(sub.pip)
    return shlex.join(args), runtime_env


def refuse_credentials(overrides: list[str], env: dict[str, str], secret_env: tuple[str, ...] = ()) -> None:
    """A job's command line and environment are stored with it (and shown by the dashboard): storage
    credentials must not be among them; the cluster's nodes hold them in their own environment."""
    for override in overrides:
        key = override.split("=", 1)[0].strip()
        if key.split(".")[-1] in ("key", "secret") and "storage" in key.split("."):
            raise ClusterError(
                f"--set {key}=...: credentials must not travel with a job (it is stored with them); "
                "give the cluster's nodes the variables named by storage.key_env and storage.secret_env"
            )
    for name in env:
        if name in (*SECRET_ENV, *secret_env):
            raise ClusterError(
                f"--env {name}=...: credentials must not travel with a job (its environment is stored "
                "with it); set them in the cluster's own environment"
            )


def submit(sub: Submission, address: str | None) -> str:
    """Submit the job; returns its submission id."""
    client = _call(job_client, address)
    deadline = time.monotonic() + AGENT_WAIT_S
    with tempfile.TemporaryDirectory(prefix="pathray-submit-") as tmp:
        entrypoint, runtime_env = prepare(sub, Path(tmp))
        while True:
            try:
                return _call(
                    client.submit_job,
                    entrypoint=entrypoint,
                    runtime_env=runtime_env,
                    submission_id=sub.submission_id,
                    entrypoint_num_cpus=sub.entrypoint_cpus,
                )
            except ClusterError as exc:
                if "No available agent" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(2.0)


def _call(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Ray's client raises bare RuntimeErrors and ConnectionErrors: say which cluster answered what."""
    try:
        return func(*args, **kwargs)
    except (RuntimeError, ConnectionError, ValueError) as exc:
        raise ClusterError(f"Ray Jobs API: {exc}") from None


def wait(job_id: str, address: str | None, echo: Callable[[str], None] = print, poll_s: float = 2.0) -> str:
    """Follow a job's logs until it ends; returns its final status (SUCCEEDED, FAILED, STOPPED)."""
    client = _call(job_client, address)
    shown = 0
    while True:
        status = str(_call(client.get_job_status, job_id).value)
        logs = _call(client.get_job_logs, job_id)
        if len(logs) > shown:
            echo(logs[shown:].rstrip("\n"))
            shown = len(logs)
        if status in TERMINAL:
            return status
        time.sleep(poll_s)


def status(job_id: str, address: str | None) -> dict[str, Any]:
    """A job's status, message, entrypoint and times."""
    info = _call(_call(job_client, address).get_job_info, job_id)
    return {
        "job_id": job_id,
        "status": str(info.status.value),
        "message": info.message,
        "entrypoint": info.entrypoint,
        "start_time": info.start_time,
        "end_time": info.end_time,
    }


def logs(job_id: str, address: str | None) -> str:
    return _call(_call(job_client, address).get_job_logs, job_id)


def stop(job_id: str, address: str | None) -> bool:
    """Ask Ray to stop a job; False when it had already ended."""
    return bool(_call(_call(job_client, address).stop_job, job_id))
