"""Preference-pair data: readers (folder w/ l/, JSONL, CSV, Pick-a-Pic parquet), image loading,
aspect-ratio buckets, augmentation, the batch contract (`PairBatch`).

Names load from their modules on first use: the readers and image checks need no torch
(``--check`` uses them); the dataset, samplers and loader do.
"""

from __future__ import annotations

from ..utils.lazy import lazy_getattr, module_of_names

_EXPORTS = {
    "augment": ("Draw", "PairAugmentation"),
    "batch": ("PairBatch",),
    "buckets": ("BucketSpec", "bucket_resolutions", "pair_bucket_hw", "select_bucket"),
    "errors": ("PairDataError",),
    "images": ("IMAGE_EXTENSIONS", "fit_to_size", "load_image"),
    "loader": ("make_dataloader", "make_pair_loader", "pair_loader", "pair_target_sizes"),
    "pairs": ("PairDataset", "collate_pairs", "split_pair"),
    "readers": ("read_csv_manifest", "read_jsonl_manifest", "read_pair_folder",
                "read_pairs"),
    "pickapic": ("read_pickapic",),
    "records": ("ImageSource", "PairRecord", "ParquetImage"),
    "sampler": ("BucketBatchSampler", "PairBatchSampler"),
    "sources": ("ImageReader",),
}
_MODULE_OF = module_of_names(_EXPORTS)
__all__ = sorted(_MODULE_OF)
__getattr__ = lazy_getattr(__name__, _MODULE_OF, globals())
