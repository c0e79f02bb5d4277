"""Live progress of a run: its ``history.jsonl`` (rewritten by rank 0 at every report), followed.

with HistoryWatcher(run_dir, storage, show=lambda row: print(progress_line(row, steps))):
    trainer.fit()
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

from pathray.storage import StorageConfig, StorageError, join_uri, read_bytes
from pathray.training.outputs import HISTORY_FILE


def progress_line(row: dict[str, Any], steps: int) -> str:
    """One line for people: step, loss, learning rate, tiles/s, data wait and ETA; at checkpoints
    the val score too (and that the run stopped early); an SSL run's watched scores and a collapse
    warning where they were measured (step 0: the initial weights)."""
    ssl = "".join(
        f"  {name} {float(row[f'ssl/{name}']):.3f}"
        for name in ("rankme", "odcorr", "knn_acc", "linear_acc")
        if f"ssl/{name}" in row
    )
    if row.get("ssl/collapse_warning"):
        ssl += "  COLLAPSE WARNING: RankMe fell below its share of the peak"
    if "loss" not in row:
        return f"step {int(row['step'])}/{steps}  initial weights:{ssl}"
    eta = float(row.get("eta_s", 0.0))
    minutes, seconds = divmod(int(round(eta)), 60)
    line = (
        f"step {int(row['step'])}/{steps}  loss {float(row['loss']):.4f}  lr {float(row['lr']):.2e}  "
        f"tiles/s {float(row.get('tiles_per_s', 0.0)):.0f}  "
        f"data wait {100 * float(row.get('data_wait_share', 0.0)):.0f} %  ETA {minutes}:{seconds:02d}"
    )
    if "val/score" in row:
        line += f"  val {float(row['val/score']):.3f}"
    if row.get("stopped_early"):
        line += "  (stopped early: no better val score)"
    return line + ssl


class HistoryWatcher:
    """Calls ``show(row)`` for every new row of a run's history while the run lives (a thread)."""

    def __init__(
        self,
        run_dir: str,
        storage: StorageConfig | None,
        show: Callable[[dict[str, Any]], None],
        every_s: float = 2.0,
    ) -> None:
        self.uri = join_uri(run_dir, HISTORY_FILE)
        self.storage, self.show, self.every_s = storage, show, every_s
        self.seen = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pathray-progress", daemon=True)

    def poll(self) -> None:
        """Show the rows added since the last poll (none while the file is missing or unreadable)."""
        try:
            text = read_bytes(self.uri, self.storage).decode()
        except StorageError:
            return
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        for row in rows[self.seen :]:
            if "loss" in row or "ssl/rankme" in row:
                self.show(row)
        self.seen = max(self.seen, len(rows))

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.poll()

    def __enter__(self) -> HistoryWatcher:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()
