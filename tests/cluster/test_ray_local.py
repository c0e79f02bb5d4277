"""The local Ray that ``ensure_ray`` starts: reachable on loopback only."""

from __future__ import annotations

import ipaddress

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
