"""One analysis's record: its state, progress and timings, and the status document clients read."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel

from pathray.storage import describe

STATUS_FILE = "status.json"
STATES = ("queued", "running", "done", "failed")


class Progress(BaseModel):
    """Tiles and chunks done of the slide's tissue grid (totals are null until it is planned)."""

    done_tiles: int
    total_tiles: int | None
    chunks_done: int
    chunks_total: int | None
    retries: int
    failed_tiles: int = 0


class AnalysisStatus(BaseModel):
    """``GET /v1/analyses/{id}``: state, reason of a failure, progress, timings, links to the files."""

    id: str
    status: Literal["queued", "running", "done", "failed"]
    reason: str | None
    slide: str
    model: str
    mpp: float | None = None
    kind: Literal["analysis", "embedding"] = "analysis"
    progress: Progress
    timings: dict[str, float]
    links: dict[str, str]
    files: dict[str, str]
    heartbeat: float


@dataclass
class Analysis:
    """One analysis's state; ``doc()`` is what ``GET /v1/analyses/{id}`` returns."""

    id: str
    slide: str
    model: str
    outputs: list[str]
    uri: str = ""  # the checked URI that is opened (for local files: the resolved path)
    mpp: float | None = None  # level-0 µm/px the request gave (overrides the slide's metadata)
    kind: str = "analysis"  # or "embedding": POST /v1/embeddings
    overlap: float = 0.0  # embeddings: grid overlap between neighbouring tiles
    state: str = "queued"
    reason: str | None = None
    done_tiles: int = 0
    total_tiles: int | None = None
    chunks_done: int = 0
    chunks_total: int | None = None
    retries: int = 0
    failed_tiles: int = 0
    created: float = field(default_factory=time.time)
    heartbeat: float = field(default_factory=time.time)
    saves: int = 0  # status.json versions made; a late write of an older one is skipped
    written: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    timings: dict[str, float] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    def doc(self) -> dict[str, Any]:
        base = "/v1/embeddings" if self.kind == "embedding" else "/v1/analyses"
        links = {"self": f"{base}/{self.id}"}
        if self.state == "done":
            links.update({name: f"{base}/{self.id}/{name}" for name in self.outputs})
        return {
            "id": self.id,
            "status": self.state,
            "reason": self.reason,
            "slide": self.slide,
            "model": self.model,
            "mpp": self.mpp,
            "kind": self.kind,
            "progress": {
                "done_tiles": self.done_tiles,
                "total_tiles": self.total_tiles,
                "chunks_done": self.chunks_done,
                "chunks_total": self.chunks_total,
                "retries": self.retries,
                "failed_tiles": self.failed_tiles,
            },
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "links": links,
            "files": self.files,
            "heartbeat": self.heartbeat,
        }


def failure_reason(exc: BaseException) -> str:
    """A one-line reason for people: the root cause of a Ray task error, not its traceback, with
    no signed URL or credential in it (``redact``)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException) and cause is not exc:
        return failure_reason(cause)
    return describe(exc)
