"""pathray: train and serve pathology foundation models on Ray, straight from object storage."""

__version__ = "0.1.0"
