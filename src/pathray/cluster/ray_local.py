"""Connect to a Ray cluster (``RAY_ADDRESS``) or start a quiet local one on 127.0.0.1."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# Run by every worker of a local Ray started without the dashboard (see ``quiet_worker``).
QUIET_WORKER_HOOK = "pathray.cluster.ray_local.quiet_worker"
# Ray Train's placement-group cleaner asks the State API, which the dashboard serves, whether the
# training controller lives, once a second, and warns each time it cannot ask.
_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
_CLEANER_NO_STATE_API = "Failed to query Ray Train Controller actor state"


def ensure_ray(
    num_cpus: int | None = None, address: str | None = None, dashboard: bool = False, **kwargs: Any
) -> str | None:
    """``ray.init`` once: the cluster at ``address``/``RAY_ADDRESS`` if any, else a new local one.

    Without an address a new local Ray starts even when a ``ray start`` cluster runs on this
    machine (Ray itself would attach to that one): set ``RAY_ADDRESS=auto`` to attach to it.

    A local Ray listens on 127.0.0.1 only (its GCS, raylet, agents and workers; see
    ``loopback_node``), without usage reporting, and gets progress bars off, so a laptop run and a
    test look the same as a cluster run. Its dashboard starts only with ``dashboard`` (on 127.0.0.1
    too; port 8265 or the next free one): it costs seconds and memory. Without it, its workers
    run ``quiet_worker`` as they start (``worker_setup``; a ``runtime_env`` hook of the caller's
    own wins where it applies).

    Returns the dashboard's URL when ``dashboard`` is set and one is known (a cluster's own
    dashboard when attaching to one), else None.
    """
    import ray
    from ray.data import DataContext

    if ray.is_initialized():
        return None
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        context = ray.init(address=address, **kwargs)
    else:
        with loopback_node(), worker_setup(None if dashboard else QUIET_WORKER_HOOK):
            context = ray.init(
                address="local",
                num_cpus=num_cpus,
                include_dashboard=dashboard,
                dashboard_host="127.0.0.1",
                _node_ip_address="127.0.0.1",
                log_to_driver=kwargs.pop("log_to_driver", True),
                **kwargs,
            )
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    url = getattr(context, "dashboard_url", None)
    if not dashboard or not url:
        return None
    return url if "://" in url else f"http://{url}"


@contextmanager
def loopback_node() -> Iterator[None]:
    """While open, a Ray node started in this process takes 127.0.0.1 as its address.

    ``ray.init`` turns ``_node_ip_address="127.0.0.1"`` into the machine's routable address (Ray
    2.60: ``services.resolve_ip_for_localhost``), and its GCS, raylet and workers then listen on
    every interface. Ray keeps the loopback address only where it treats the machine as one that
    joins no cluster (``ray_constants.ENABLE_RAY_CLUSTER`` false, as on macOS and Windows), so that
    flag is lowered for the start alone. It is not set in the environment: a ``ray start``
    run from this process, to join or head a real cluster, must not inherit it.
    """
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


@contextmanager
def worker_setup(hook: str | None) -> Iterator[None]:
    """While open, a Ray node started in this process has its workers run ``hook`` (a
    ``module.function`` path) as they start.

    Ray's workers run the function their environment names in Ray's setup-hook variable (what a
    job-level ``runtime_env`` ``worker_process_setup_hook`` becomes). Set in this process's
    environment for the start alone, it reaches the raylet, which every worker inherits from,
    without a job runtime environment (that measured 0.3-0.4 s more to start each reader actor).
    A ``ray start`` or job submission from this process later does not inherit it, and a value
    already there (this process itself a Ray worker) is left alone.
    """
    from ray._private import ray_constants

    key = ray_constants.WORKER_PROCESS_SETUP_HOOK_ENV_VAR
    if hook is None or key in os.environ:
        yield
        return
    os.environ[key] = hook
    try:
        yield
    finally:
        os.environ.pop(key, None)


def quiet_worker() -> None:
    """Worker set-up of a local Ray without the dashboard: drops the one warning that only says
    the dashboard is off.

    Ray Train's placement-group cleaner warns once a second, for the whole run, that the State API
    is unavailable (it is served by the dashboard). That check cannot succeed on such a cluster,
    and the cluster ends with its driver, so the warning tells nothing; the cleaner's other
    warnings, and every other logger, are left as they are.
    """
    logging.getLogger(_CLEANER_LOGGER).addFilter(_not_state_api_unavailable)


def _not_state_api_unavailable(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_CLEANER_NO_STATE_API)
