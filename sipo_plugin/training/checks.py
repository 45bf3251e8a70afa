"""Start-up checks that read the filesystem: the model folder against ``family``, the pair data
(paths, captions, same-file pairs; with ``deep``, every image decodes).

They run before the model loads (``train``) and in ``--check``; none imports torch or diffusers.
Each returns every problem it finds, one line each.
"""

from __future__ import annotations

from pathlib import Path

from ..data.errors import PairDataError
from ..models.families import FAMILIES, family_of_pipeline, folder_pipeline_class
from .config import TOY_MODEL, Config

# the bundled toy pipeline (what TOY_MODEL names; sipo_plugin.toy.pipeline.TOY_MODEL_DIR)
TOY_MODEL_DIR = Path(__file__).resolve().parents[1] / "toy" / "model"


def model_folder(config: Config) -> Path | None:
    """The diffusers folder holding the model's configs: the model folder, a single file's
    model_config, or the toy model; None when there is none to read."""
    m = config.model
    if m.pretrained_model_name_or_path == TOY_MODEL:
        return TOY_MODEL_DIR
    path = Path(m.pretrained_model_name_or_path)
    if path.is_dir():
        return path
    return Path(m.model_config) if m.model_config else None


def model_family_problems(config: Config) -> list[str]:
    """"family mismatch" when the folder's model_index.json declares another family's pipeline."""
    folder = model_folder(config)
    declared = folder_pipeline_class(folder) if folder is not None else None
    if declared is None:
        return []  # not a diffusers folder: the loader says so, naming the file
    family = config.model.family
    actual = family_of_pipeline(declared)
    if family not in FAMILIES:
        return []  # the unknown family is reported on its own
    if actual is None:
        known = ", ".join(f"{name}: {'/'.join(f.pipelines)}" for name, f in FAMILIES.items())
        return [f"{folder}/model_index.json: declares {declared}, not a pipeline of a family this "
                f"package trains ({known})"]
    if actual != family:
        return [f"family mismatch: {folder} holds a {actual} model ({declared} in "
                f"model_index.json) but family = \"{family}\"; set family = \"{actual}\" or point "
                f"pretrained_model_name_or_path at a {family} model"]
    return []


def data_problems(config: Config, *, deep: bool = False) -> list[str]:
    """The pair data reads (paths, captions, no same-file pairs) and holds a batch; with ``deep``,
    every image decodes. Data the [pairs] step will make is not checked."""
    from ..data.check import undecodable_images
    from ..data.readers import read_pairs
    d, t = config.data, config.training
    if config.pairs.pairs_prompts and not Path(d.train_data).exists():
        return []
    try:
        records = read_pairs(d.train_data, caption_extension=d.caption_extension, log=None)
    except PairDataError as err:
        return [str(err)]
    problems = []
    if 0 < len(records) < t.train_batch_size:
        problems.append(f"{d.train_data}: {len(records)} pairs, fewer than train_batch_size = "
                        f"{t.train_batch_size}")
    if deep and not d.num_frames:  # video clips are decoded by the video reader at load time
        problems.extend(undecodable_images(records))
    return problems


def startup_problems(config: Config, *, deep: bool = False) -> list[str]:
    """Every problem of the model folder and the data (``deep``: decode every image too)."""
    return model_family_problems(config) + data_problems(config, deep=deep)
