"""Whole-slide inference without Ray: tissue grid, batched prediction, stitching, outputs."""
