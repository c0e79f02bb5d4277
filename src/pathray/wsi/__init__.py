"""Slide access, tissue masks, samplers, annotations and synthetic slides (no Ray)."""
