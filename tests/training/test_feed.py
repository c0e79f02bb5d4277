"""The Ray-free feed of a GPU box: producer processes -> shared slots -> loader thread, on CPU."""

from __future__ import annotations

from pathlib import Path


def test_process_feed_delivers_distinct_full_batches_and_cleans_up(manifest_path):
    import torch

    from pathray.config import load_config
    from pathray.datasets.manifest import load_manifest
    from pathray.training.feed import ProcessFeed

    cfg = load_config(
        Path(__file__).resolve().parents[2] / "configs" / "gleason-cnn.yaml",
        ["engine.name=debug_cnn", "engine.model=null", "data.stream.sampler.tiles_per_slide=16"],
    )
    feed = ProcessFeed(load_manifest(manifest_path), cfg, batch=8, producers=2, device="cpu", timeout=120)
    try:
        batches = [next(feed) for _ in range(4)]
    finally:
        feed.close()
    size = cfg.data.stream.sampler.size
    for batch in batches:
        assert batch["image"].shape == (8, size, size, 3) and batch["image"].dtype == torch.uint8
        assert batch["target"].shape == (8, size, size)
        assert len(batch["slide_id"]) == 8 and all(isinstance(s, str) for s in batch["slide_id"])
    # four different batches: no slot was delivered twice
    coords = {tuple(zip(b["x"].tolist(), b["y"].tolist(), b["slide_id"], strict=True)) for b in batches}
    assert len(coords) == 4
    assert all(not p.is_alive() for p in feed._procs)
    assert not Path(feed._dir.name).exists()
