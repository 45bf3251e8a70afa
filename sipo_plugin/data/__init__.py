"""Preference-pair data: readers (folder w/ l/, JSONL, CSV, Pick-a-Pic parquet), image loading,
aspect-ratio buckets, augmentation, batch layout."""

from .augment import Draw, PairAugmentation
from .buckets import BucketSpec, bucket_resolutions, pair_bucket_hw, select_bucket
from .errors import PairDataError
from .images import IMAGE_EXTENSIONS, fit_to_size, load_image
from .loader import make_pair_loader, pair_target_sizes
from .pairs import (
    PairDataset,
    PairRecord,
    collate_pairs,
    read_csv_manifest,
    read_jsonl_manifest,
    read_pair_folder,
    read_pairs,
    split_pair,
)
from .pickapic import ParquetImage, read_pickapic
from .sampler import BucketBatchSampler, PairBatchSampler
from .sources import ImageReader, ImageSource

__all__ = [
    "IMAGE_EXTENSIONS",
    "BucketBatchSampler",
    "BucketSpec",
    "Draw",
    "ImageReader",
    "ImageSource",
    "PairAugmentation",
    "PairDataError",
    "PairDataset",
    "PairBatchSampler",
    "PairRecord",
    "ParquetImage",
    "bucket_resolutions",
    "collate_pairs",
    "fit_to_size",
    "load_image",
    "make_pair_loader",
    "pair_bucket_hw",
    "pair_target_sizes",
    "read_csv_manifest",
    "read_jsonl_manifest",
    "read_pair_folder",
    "read_pairs",
    "read_pickapic",
    "select_bucket",
    "split_pair",
]
