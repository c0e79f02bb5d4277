"""Connect to a Ray cluster (``RAY_ADDRESS``) or start a quiet local one on 127.0.0.1."""

from __future__ import annotations

import os
from typing import Any


def ensure_ray(num_cpus: int | None = None, address: str | None = None, **kwargs: Any) -> None:
    """``ray.init`` once: the cluster at ``address``/``RAY_ADDRESS`` if any, else a new local one.

    Without an address a new local Ray starts even when a ``ray start`` cluster runs on this
    machine (Ray itself would attach to that one): set ``RAY_ADDRESS=auto`` to attach to it.

    A local Ray binds to 127.0.0.1, without the dashboard or usage reporting, and gets
    progress bars off, so a laptop run and a test look the same as a cluster run.
    """
    import ray
    from ray.data import DataContext

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=kwargs.pop("log_to_driver", True),
            **kwargs,
        )
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
