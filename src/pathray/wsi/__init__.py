"""Whole-slide images, Ray-free: ``backends`` (slides, ranged reads, levels), ``patching`` (tissue,
samplers), ``annotations`` (GeoJSON -> targets) and ``synth`` (synthetic slides with ground truth)."""
