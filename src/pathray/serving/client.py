"""A plain HTTP client of the analysis API (urllib only): submit, poll with progress, download.

summary = analyze_remote("http://127.0.0.1:8000", "s3://slides/a.svs", "gleason", "out/")
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any


class RemoteAnalysisError(RuntimeError):
    """The service refused the request or the analysis failed; the message is the service's reason."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def _request(
    url: str, token: str | None, body: dict[str, Any] | None = None, timeout: float = 30.0
) -> tuple[int, bytes]:
    headers = {"Accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - the user's endpoint
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        try:
            detail = json.dumps(json.loads(detail).get("detail", detail))
        except (ValueError, AttributeError):
            pass
        raise RemoteAnalysisError(f"{url}: HTTP {exc.code}: {detail}", exc.code) from None
    except urllib.error.URLError as exc:
        raise RemoteAnalysisError(f"{url}: {exc.reason}") from None


def analyze_remote(
    endpoint: str,
    slide: str,
    model: str,
    out: str | Path,
    token: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    poll_s: float = 0.5,
    timeout_s: float = 3600.0,
    mpp: float | None = None,
) -> dict[str, Any]:
    """Analyse ``slide`` with ``model`` on a pathray service; files land in ``out``.

    Args:
        endpoint: the service's base URL (``http://127.0.0.1:8000``).
        slide: a slide URI the service may read (under its allowed prefixes).
        model: a model id of ``GET /v1/models``.
        out: folder for overlay.png, mask.png, annotations.geojson, summary.json.
        token: bearer token when the service has one.
        progress: called with (tiles done, tiles total) whenever the service reports progress.
        mpp: the slide's level-0 µm/px, overriding its metadata (for slides that have none).

    Returns:
        The summary (``summary.json``), with ``id`` and ``files`` (local paths) added.

    Raises:
        RemoteAnalysisError: refused (403, 404, ...), failed (with the service's reason) or timed out.
    """
    base = endpoint.rstrip("/")
    body: dict[str, Any] = {"slide": slide, "model": model}
    if mpp is not None:
        body["mpp"] = mpp
    _, raw = _request(f"{base}/v1/analyses", token, body)
    analysis_id = json.loads(raw)["id"]
    deadline = time.monotonic() + timeout_s
    seen = (-1, -1)
    while True:
        _, raw = _request(f"{base}/v1/analyses/{analysis_id}", token)
        doc = json.loads(raw)
        done, total = doc["progress"]["done_tiles"], doc["progress"]["total_tiles"]
        if progress is not None and total is not None and (done, total) != seen:
            seen = (done, total)
            progress(done, total)
        if doc["status"] == "failed":
            raise RemoteAnalysisError(f"analysis {analysis_id} of {slide} failed: {doc['reason']}")
        if doc["status"] == "done":
            break
        if time.monotonic() > deadline:
            raise RemoteAnalysisError(f"analysis {analysis_id} still {doc['status']} after {timeout_s:.0f} s")
        time.sleep(poll_s)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, link in doc["links"].items():
        if name == "self":
            continue
        _, data = _request(f"{base}{link}", token)
        (folder / name).write_bytes(data)
        files[name] = str(folder / name)
    summary = json.loads((folder / "summary.json").read_bytes())
    return {**summary, "id": analysis_id, "files": files}
