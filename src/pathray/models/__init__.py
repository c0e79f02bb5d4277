"""Engines, task heads, losses, metrics and DINO (no Ray)."""
