"""Start-up checks that read the filesystem or probe a device: the paths a preset names, the LoRA
file a run starts from, ``reference_device``, the model folder against ``family``, the pair data
(paths, captions, same-file pairs; with ``deep``, every image decodes).

They run before the model loads (``train``) and in ``--check``; none imports torch or diffusers
unless the setting it checks needs it (``reference_device``; a ``network_weights`` file).
Each returns every problem it finds, one line each.
"""

from __future__ import annotations

from pathlib import Path

from ...data.check import undecodable_images
from ...data.errors import PairDataError
from ...data.readers import read_pairs
from ...models.families import FAMILIES, family_of_pipeline, folder_pipeline_class, named_model
from ..config_schema import Config, ConfigError
from ..online_config import reads_train_data


def model_folder(config: Config) -> Path | None:
    """The diffusers folder holding the model's configs: the model folder, a single file's
    model_config, or a registered model's (the toy world's "toy"); None when there is none."""
    m = config.model
    named = named_model(m.pretrained_model_name_or_path)
    if named is not None:
        return named.folder
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
    d, t = config.data, config.training
    if config.pairs.pairs_prompts and not Path(d.train_data).exists():
        return []
    if not reads_train_data(config):  # online without offline_mix: no pair data to check
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


def paths(config: Config) -> None:
    """The model, model_config and train_data exist (train_data may be made by [pairs])."""
    where, m, d = config.source, config.model, config.data
    problems = []
    name_or_path = m.pretrained_model_name_or_path
    if named_model(name_or_path) is None and not Path(name_or_path).exists():
        problems.append(f"{where}: model not found: {m.pretrained_model_name_or_path} (set "
                        "pretrained_model_name_or_path to a diffusers folder or .safetensors file)")
    if m.model_config and not Path(m.model_config).is_dir():
        problems.append(f"{where}: model_config folder not found: {m.model_config}")
    if not d.train_data and not config.online.enabled:
        problems.append(f"{where}: set [data] train_data to a pair folder or a .jsonl/.csv manifest")
    elif d.train_data and not config.pairs.pairs_prompts and not Path(d.train_data).exists():
        problems.append(f"{where}: train_data not found: {d.train_data} "
                        "(a folder with w/ and l/, or a .jsonl/.csv manifest)")
    if problems:
        raise ConfigError(problems)


def network_weights_problem(network_weights: str) -> str | None:
    """``network_weights`` (when set) names a .safetensors LoRA file or a folder holding one."""
    if not network_weights:
        return None
    # the export package imports torch: loaded only when a run starts from a LoRA file
    from ...export.lora_file import LORA_FILE_IN_FOLDER, network_weights_file
    file = network_weights_file(network_weights)
    if not file.is_file() or file.suffix != ".safetensors":
        return (f"network_weights: no LoRA file at {file} (give a .safetensors LoRA, or a folder "
                f"holding {LORA_FILE_IN_FOLDER})")
    return None


def reference_device_problem(device: str) -> str | None:
    """``reference_device`` (when set) names a device torch knows and this machine has (else a
    traceback at the copy, after the model loaded)."""
    if not device:
        return None
    import torch  # only a set reference_device needs torch (--check stays torch-free otherwise)
    try:
        kind = torch.device(device).type
    except RuntimeError:
        return f"'reference_device' = '{device}' is not a device (e.g. 'cpu', 'cuda', 'cuda:1')"
    is_available = getattr(getattr(torch, kind, None), "is_available", None)
    if kind != "cpu" and not (is_available and is_available()):
        return (f"'reference_device' = '{device}': no {kind} device on this machine; set "
                "reference_device = \"cpu\" or leave it empty")
    return None
