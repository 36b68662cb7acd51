"""Data: one input pipeline for the recipes and users' own code: sources, the ImageNet transforms, a resumable loader.

- Sources: :class:`ShardSource` (WebDataset shards read with webdataset's ``gopen``: local paths, brace patterns,
  ``pipe:`` commands, http(s); dealt to ranks x workers or resampled; in-shard shuffle buffer; img2dataset
  image-text shards), :class:`ImageFolderSource` (ImageNet-style class folders), :class:`TensorSource` (in-memory
  uint8 images, e.g. :func:`load_image_set` output).
- Transforms: :func:`train_transform` (RandomResizedCrop of the original image, flip, timm RandAugment) and
  :func:`val_transform` (shorter side to ``size / crop_pct``, center crop), decoding JPEGs at the size they need
  (:func:`decode_image`: Pillow's draft, or simplejpeg with the ``fast`` extra).
- Loader: :func:`make_loader` (torchdata's StatefulDataLoader; :class:`ShardedSampler` for map-style sources),
  yielding :class:`Batch` es; exact mid-epoch resume with :func:`gather_loader_states` / :func:`load_loader_state`
  (one state per rank).
- Bad data: skipped, carried with the batch as :class:`BadSample` records, counted by :class:`BadSampleBudget`.
- Recipes: :func:`split_sources` (train/val sources from a data config), :func:`epoch_size`,
  :func:`digits_arrays`.
- Before training: :func:`check_sources`. In the loop: ``advtrain.training.StepTimer`` times the data wait and
  end-to-end img/s.
"""

from advtrain.data._bad import BadSample, BadSampleBudget, BadSampleError
from advtrain.data._checks import check_sources
from advtrain.data._decode import decode_image, fast_decoder_available, image_size
from advtrain.data._loader import (
    Batch,
    Loader,
    ShardedSampler,
    collate,
    gather_loader_states,
    load_loader_state,
    loader_state,
    make_loader,
)
from advtrain.data._recipe import (
    AugmentConfig,
    DataConfig,
    check_run_sources,
    class_names,
    digits_arrays,
    epoch_size,
    eval_subset,
    sources_from_config,
    split_sources,
)
from advtrain.data._shards import ImageSet, load_image_set, shard_paths
from advtrain.data._sources import ImageFolderSource, Sample, ShardSource, TensorSource, shuffled, stable_seed
from advtrain.data._transforms import random_erase, resize_dims, sample_crop_box, train_transform, val_transform
from advtrain.data._webdataset import ShardReadError, expand_urls, iter_shard_samples, manifest_counts

__all__ = [
    "AugmentConfig",
    "BadSample",
    "BadSampleBudget",
    "BadSampleError",
    "Batch",
    "DataConfig",
    "ImageFolderSource",
    "ImageSet",
    "Loader",
    "Sample",
    "ShardReadError",
    "ShardSource",
    "ShardedSampler",
    "TensorSource",
    "check_run_sources",
    "check_sources",
    "class_names",
    "collate",
    "decode_image",
    "digits_arrays",
    "epoch_size",
    "eval_subset",
    "expand_urls",
    "fast_decoder_available",
    "gather_loader_states",
    "image_size",
    "iter_shard_samples",
    "load_image_set",
    "load_loader_state",
    "loader_state",
    "make_loader",
    "manifest_counts",
    "resize_dims",
    "sample_crop_box",
    "shard_paths",
    "shuffled",
    "sources_from_config",
    "split_sources",
    "stable_seed",
    "random_erase",
    "train_transform",
    "val_transform",
]
