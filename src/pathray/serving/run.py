"""Start the app on Serve at the configured host and port (``pathray serve`` and the tests)."""

from __future__ import annotations

import socket

from pathray.serving.config import ServeAppConfig


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def start_app(cfg: ServeAppConfig) -> str:
    """Deploy the app on the connected Ray (entry points start or attach one); returns its base URL.

    Port 0 picks a free port. Serve's HTTP options are fixed once Serve runs on a cluster, so a
    second app on the same cluster shares the first one's host and port.
    """
    from ray import serve

    from pathray.serving.app import build_app

    http = cfg.serve.http
    port = http.port or free_port(http.host)
    serve.start(http_options={"host": http.host, "port": port})
    serve.run(build_app(cfg), name=http.app_name, route_prefix=http.route_prefix)
    return f"http://{http.host}:{port}{http.route_prefix.rstrip('/')}"


def stop_app(cfg: ServeAppConfig, ray_ends: bool = False) -> None:
    """Take the app down: all of Serve on a local Ray, only this app on a shared cluster.

    ``ray_ends``: the caller's local Ray is shut down right after (the demo, ``pathray serve`` when
    stopped), so only the app is deleted and Serve's controller goes with Ray. ``serve.shutdown``
    kills the controller while its own shutdown call is in flight, which Ray prints on the
    console as a failed ``ServeController.graceful_shutdown`` task.
    """
    import os

    from ray import serve

    if ray_ends or os.environ.get("RAY_ADDRESS"):
        serve.delete(cfg.serve.http.app_name)
    else:
        serve.shutdown()
