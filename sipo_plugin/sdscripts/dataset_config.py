"""sd-scripts' dataset config (``--dataset_config D.toml``) over preference-pair folders.

The layout of sd-scripts' ``library/config_util.py``: ``[general]``, ``[[datasets]]`` and
``[[datasets.subsets]]``; a subset's value falls back to its dataset's, then to ``[general]``'s,
then to the run's own setting. Each subset's ``image_dir`` is a pair folder (``w/`` and ``l/``,
captions beside the winners: `sipo_plugin.data.pairs`), with its own ``caption_extension``;
``num_repeats`` lists its pairs that many times per epoch, as sd-scripts repeats images. What this
project sets once per run (resolution, batch size, buckets, flip_aug, caption_dropout_rate) must
agree across datasets and subsets. ``image_dir`` paths are taken as sd-scripts takes them
(relative to the working directory).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config_file import SdScriptsError, is_neutral, parse_resolution, read_toml

# sd-scripts dataset / subset keys that map onto this project's run settings
RUN_SETTINGS = {"resolution": "resolution", "batch_size": "train_batch_size",
                "enable_bucket": "enable_bucket", "min_bucket_reso": "min_bucket_reso",
                "max_bucket_reso": "max_bucket_reso", "bucket_reso_steps": "bucket_reso_steps",
                "flip_aug": "flip_aug", "caption_dropout_rate": "caption_dropout_rate"}
SUBSET_LEVEL = ("flip_aug", "caption_dropout_rate", "caption_extension", "num_repeats")
# sd-scripts keys with no effect on pair data here (reported in the "not used here" line)
UNUSED = ("shuffle_caption", "keep_tokens", "keep_tokens_separator", "caption_separator",
          "secondary_separator", "enable_wildcard", "color_aug", "random_crop", "class_tokens",
          "caption_prefix", "caption_suffix", "face_crop_aug_range", "caption_tag_dropout_rate",
          "caption_dropout_every_n_epochs", "token_warmup_min", "token_warmup_step", "cache_info",
          "bucket_no_upscale", "network_multiplier", "alpha_mask", "is_reg")
TYPES: dict[str, tuple[type, ...]] = {
    "image_dir": (str,), "caption_extension": (str,), "num_repeats": (int,), "batch_size": (int,),
    "enable_bucket": (bool,), "min_bucket_reso": (int,), "max_bucket_reso": (int,),
    "bucket_reso_steps": (int,), "flip_aug": (bool,), "caption_dropout_rate": (int, float),
    "resolution": (int, list), "shuffle_caption": (bool,), "keep_tokens": (int,),
    "color_aug": (bool,), "random_crop": (bool,), "is_reg": (bool,), "class_tokens": (str,),
    "bucket_no_upscale": (bool,),
}
KIND = {str: "a string", int: "an integer", bool: "true or false", float: "a number",
        list: "a list"}


@dataclass(frozen=True)
class PairSubset:
    image_dir: Path
    num_repeats: int
    caption_extension: str | None  # None: the run's caption_extension


@dataclass(frozen=True)
class DatasetConfig:
    path: Path
    subsets: tuple[PairSubset, ...]
    settings: dict  # this project's bare setting names -> values
    unused: tuple[str, ...]


def _check(path: Path, where: str, key: str, value: Any) -> Any:
    """sd-scripts' schema types (bool is not an int; a number may be an int)."""
    if key in ("metadata_file", "conditioning_data_dir"):
        raise SdScriptsError(f"{path}: {where}.{key}: fine-tuning / ControlNet subsets are not "
                             "pair folders; give image_dir = a folder with w/ and l/")
    if key not in TYPES and key not in UNUSED and key not in RUN_SETTINGS:
        raise SdScriptsError(f"{path}: {where}: unknown key '{key}'")
    allowed = TYPES.get(key)
    if allowed and (not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed)):
        kind = " or ".join(KIND[t] for t in allowed)
        raise SdScriptsError(f"{path}: {where}.{key} must be {kind}, got {value!r}")
    if key == "resolution":
        return parse_resolution(value, f"{path}: {where}")
    return value


def _table(path: Path, where: str, value: Any, nested: str | None = None) -> dict:
    if not isinstance(value, dict):
        raise SdScriptsError(f"{path}: {where} must be a table, got {value!r}")
    return {k: v if k == nested else _check(path, where, k, v) for k, v in value.items()}


def _pair_folder(path: Path, where: str, image_dir: str) -> Path:
    folder = Path(image_dir)
    if not ((folder / "w").is_dir() and (folder / "l").is_dir()):
        what = "not found" if not folder.exists() else "not a pair folder"
        raise SdScriptsError(f"{path}: {where}.image_dir = '{image_dir}': {what} (image_dir must "
                             "be a folder with w/ (winners, captions beside them) and l/ (losers))")
    return folder


def _agreed(path: Path, key: str, values: list[tuple[str, Any]]) -> Any:
    """The one value of a per-run setting, or an error naming two places that differ."""
    given = [(where, v) for where, v in values if v is not None]
    for where, value in given[1:]:
        if value != given[0][1]:
            raise SdScriptsError(f"{path}: '{key}' differs between {given[0][0]} ({given[0][1]!r}) "
                                 f"and {where} ({value!r}); it is one setting per run here: set it "
                                 "once in [general]")
    return given[0][1] if given else None


def read_dataset_config(path: str | Path) -> DatasetConfig:
    """Parse and check an sd-scripts dataset config (every image_dir a pair folder)."""
    path = Path(path)
    raw = read_toml(path, "dataset_config")
    for key in raw:
        if key not in ("general", "datasets"):
            raise SdScriptsError(f"{path}: unknown top-level key '{key}' (sd-scripts dataset "
                                 "configs have [general] and [[datasets]])")
    general = _table(path, "[general]", raw.get("general", {}))
    datasets = raw.get("datasets", [])
    if not isinstance(datasets, list) or not datasets:
        raise SdScriptsError(f"{path}: no [[datasets]] (each with [[datasets.subsets]] image_dir)")
    subsets, per_run, unused = [], {key: [] for key in RUN_SETTINGS}, set()
    for i, dataset_raw in enumerate(datasets):
        dataset = _table(path, f"datasets[{i}]", dataset_raw, nested="subsets")
        subset_list = dataset.get("subsets", [])
        if not isinstance(subset_list, list) or not subset_list:
            raise SdScriptsError(f"{path}: datasets[{i}] has no [[datasets.subsets]]")
        for key in RUN_SETTINGS:
            if key not in SUBSET_LEVEL:
                per_run[key].append((f"datasets[{i}]", dataset.get(key, general.get(key))))
        for j, subset_raw in enumerate(subset_list):
            where = f"datasets[{i}].subsets[{j}]"
            subset = _table(path, where, subset_raw)
            merged = {**general, **{k: v for k, v in dataset.items() if k != "subsets"}, **subset}
            unused.update(k for k in UNUSED if k in merged and not is_neutral(k, merged[k]))
            if merged.get("is_reg"):
                continue  # regularization images: no role in preference pairs (reported)
            if "image_dir" not in subset:
                raise SdScriptsError(f"{path}: {where} has no image_dir")
            repeats = merged.get("num_repeats", 1)
            if repeats < 1:
                raise SdScriptsError(f"{path}: {where}.num_repeats must be >= 1, got {repeats}")
            subsets.append(PairSubset(_pair_folder(path, where, subset["image_dir"]), repeats,
                                      merged.get("caption_extension")))
            for key in ("flip_aug", "caption_dropout_rate"):
                per_run[key].append((where, merged.get(key)))
    settings = {RUN_SETTINGS[key]: value for key, values in per_run.items()
                if (value := _agreed(path, key, values)) is not None}
    return DatasetConfig(path, tuple(subsets), settings, tuple(sorted(unused)))
