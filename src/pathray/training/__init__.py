"""Ray Train: the per-worker loop, TorchTrainer wiring, checkpoints, experiments."""
