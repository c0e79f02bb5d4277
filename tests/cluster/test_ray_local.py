"""The local Ray that ``ensure_ray`` starts: reachable on loopback only."""

from __future__ import annotations

import ipaddress
import os

import psutil


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_loopback


def test_a_local_ray_listens_on_loopback_only(ray_local):
    """Every port the session's Ray processes listen on (GCS, raylet, agents, workers) is bound to a
    loopback address, and the node's address, which workers and drivers connect to, is 127.0.0.1.
    Before ``loopback_node``, Ray 2.60 swapped 127.0.0.1 for the machine's routable address and its
    GCS and raylet listened on every interface."""
    import ray

    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")

    @ray.remote(num_cpus=0)
    def node_ip() -> str:
        return ray.util.get_node_ip_address()

    assert ray.get(node_ip.remote()) == "127.0.0.1"
    me = psutil.Process()
    ours = {p.pid for p in me.children(recursive=True)}
    listening = [
        (c.laddr.ip, c.laddr.port, psutil.Process(c.pid).name())
        for c in psutil.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.pid in ours
    ]
    assert any(name == "gcs_server" for _, _, name in listening)  # Ray's processes were seen
    exposed = [entry for entry in listening if not _loopback(entry[0])]
    assert not exposed, f"listening beyond loopback: {exposed}"


def test_workers_of_a_local_ray_drop_only_the_state_api_warning(ray_local, caplog):
    """Without the dashboard, Ray Train's placement-group cleaner warned once a second, for the
    whole run, that the State API was unavailable; every worker of the local Ray now runs
    ``quiet_worker``, which drops that warning and no other, and this process's environment
    keeps no trace of the hook."""
    import logging

    import ray

    from pathray.cluster import ray_local as rl

    @ray.remote(num_cpus=0)
    def cleaner_filters() -> list[str]:
        return [getattr(f, "__name__", "") for f in logging.getLogger(rl._CLEANER_LOGGER).filters]

    assert "_not_state_api_unavailable" in ray.get(cleaner_filters.remote())
    # set for the raylet's start alone: a `ray start` or job this process runs later does not inherit it
    from ray._private.ray_constants import WORKER_PROCESS_SETUP_HOOK_ENV_VAR

    assert WORKER_PROCESS_SETUP_HOOK_ENV_VAR not in os.environ

    logger = logging.getLogger(rl._CLEANER_LOGGER)
    saved = list(logger.filters)
    try:
        rl.quiet_worker()
        with caplog.at_level(logging.WARNING, logger=rl._CLEANER_LOGGER):
            logger.warning(
                "Failed to query Ray Train Controller actor state. State API may be temporarily "
                "unavailable. Continuing to monitor."
            )
            logger.warning("Failed to clean up placement group: boom")
        assert [r.getMessage() for r in caplog.records] == ["Failed to clean up placement group: boom"]
    finally:
        logger.filters[:] = saved
