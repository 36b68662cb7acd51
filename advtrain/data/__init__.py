"""Data: decode small WebDataset image folders into memory (for tests, examples and quick experiments)."""

from advtrain.data._shards import ImageSet, load_image_set, shard_paths

__all__ = ["ImageSet", "load_image_set", "shard_paths"]
