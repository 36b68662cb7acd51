"""Data: input pipelines shared by the recipes and users (class folders, WebDataset shards, in-memory tensors).

Decode at the size a stage needs (:func:`decode_image`), the standard ImageNet transforms (:func:`train_transform`,
:func:`val_transform`), WebDataset shards through the ``webdataset`` package (:func:`expand_urls`,
:func:`iter_shard_samples`), and small in-memory sets (:func:`load_image_set`).
"""

from advtrain.data._bad import BadSample, BadSampleBudget, BadSampleError
from advtrain.data._decode import decode_image, fast_decoder_available, image_size
from advtrain.data._loader import (
    Batch,
    Loader,
    ShardedSampler,
    TimedIterator,
    collate,
    gather_loader_states,
    load_loader_state,
    loader_state,
    make_loader,
)
from advtrain.data._shards import ImageSet, load_image_set, shard_paths
from advtrain.data._sources import ImageFolderSource, Sample, ShardSource, TensorSource, shuffled, stable_seed
from advtrain.data._transforms import resize_dims, sample_crop_box, train_transform, val_transform
from advtrain.data._webdataset import ShardReadError, expand_urls, iter_shard_samples, manifest_counts

__all__ = [
    "BadSample",
    "BadSampleBudget",
    "BadSampleError",
    "Batch",
    "ImageFolderSource",
    "ImageSet",
    "Loader",
    "Sample",
    "ShardSource",
    "ShardedSampler",
    "TensorSource",
    "TimedIterator",
    "collate",
    "gather_loader_states",
    "load_loader_state",
    "loader_state",
    "make_loader",
    "shuffled",
    "stable_seed",
    "ShardReadError",
    "decode_image",
    "expand_urls",
    "fast_decoder_available",
    "image_size",
    "iter_shard_samples",
    "load_image_set",
    "manifest_counts",
    "resize_dims",
    "sample_crop_box",
    "shard_paths",
    "train_transform",
    "val_transform",
]
