"""Reading a LoRA file back: the sd-scripts/kohya and diffusers/PEFT layouts this package writes,
and sd-scripts' own files (``network_weights``).

Two layers:

* `summarize_lora_file` reads only the safetensors header (and the 0-dim ``.alpha`` values) with
  json and numpy, no torch: what the config needs to take rank, alpha, conv rank, DoRA and the text
  encoders from the file before anything loads.
* `load_lora_modules` reads the tensors: {component: {file module name: LoraModule}}, where the
  module name is the kohya name (``lora_unet_down_blocks_0_..._to_q``) or the diffusers module path
  (``down_blocks.0....to_q``); `models.lora_start` maps names onto a model's modules.

Layouts (keys):
  kohya      ``lora_unet_<name>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (0-dim;
             missing: alpha = rank) / ``.dora_scale`` (DoRA magnitude, [out, 1, ...]); text encoders
             ``lora_te_`` (SD1.x) or ``lora_te1_`` / ``lora_te2_`` (SDXL)
  diffusers  ``unet.<path>.lora_A.weight`` / ``.lora_B.weight`` / ``.lora_magnitude_vector(.weight)``;
             ``text_encoder.`` / ``text_encoder_2.``; no alpha (scale folded into lora_B: alpha = rank)
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

LORA_FILE_IN_FOLDER = "pytorch_lora_weights.safetensors"  # what a diffusers LoRA folder holds
KOHYA_COMPONENTS = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder",
                    "lora_te2": "text_encoder_2"}
DIFFUSERS_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
KOHYA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha",
               "dora_scale": "magnitude"}
DIFFUSERS_PARTS = {"lora_A.weight": "down", "lora_B.weight": "up",
                   "lora_magnitude_vector.weight": "magnitude", "lora_magnitude_vector": "magnitude"}
SGM_BLOCKS = ("input_blocks", "middle_block", "output_blocks")
# LyCORIS and other adapters that are not LoRA, told apart by their key parts
FOREIGN_PARTS = {"hada_": "LoHa", "lokr_": "LoKr", "lora_mid": "LoCon with Tucker decomposition",
                 "diff": "a full weight difference", "oft_": "OFT", "w_norm": "a norm layer",
                 "b_norm": "a norm layer", "lora.down": "old diffusers attention-processor LoRA"}


class LoraFileError(ValueError):
    """A network_weights file that cannot be used, in one line naming the file and the fix."""


def network_weights_file(network_weights: str) -> Path:
    """The LoRA file of ``network_weights``: the file itself, or a diffusers LoRA folder's
    pytorch_lora_weights.safetensors."""
    path = Path(network_weights)
    return path / LORA_FILE_IN_FOLDER if path.is_dir() else path


@dataclass(frozen=True)
class ModuleKey:
    component: str  # unet, text_encoder, text_encoder_2
    name: str  # kohya module name (underscores) or diffusers module path (dots)
    part: str  # down, up, alpha, magnitude


def split_key(key: str, layout: str) -> ModuleKey | None:
    """One tensor key -> (component, module name, part), None for a key outside ``layout``."""
    if layout == "kohya":
        name, _, part = key.partition(".")
        prefix = next((p for p in sorted(KOHYA_COMPONENTS, key=len, reverse=True)
                       if name.startswith(p + "_")), None)
        if prefix is None or part not in KOHYA_PARTS:
            return None
        return ModuleKey(KOHYA_COMPONENTS[prefix], name, KOHYA_PARTS[part])
    component, _, rest = key.partition(".")
    for suffix, part in DIFFUSERS_PARTS.items():
        if component in DIFFUSERS_COMPONENTS and rest.endswith("." + suffix):
            return ModuleKey(component, rest[: -len(suffix) - 1], part)
    return None


def key_layout(keys: list[str]) -> str:
    """"kohya" when any key has a kohya prefix, else "diffusers"."""
    return "kohya" if any(k.startswith(tuple(p + "_" for p in KOHYA_COMPONENTS)) for k in keys) \
        else "diffusers"


def unusable_keys_message(path: Path, layout: str, keys: list[str]) -> str | None:
    """One line about the first key that is not plain LoRA / DoRA in ``layout``, else None."""
    bad = [k for k in keys if split_key(k, layout) is None]
    if not bad:
        return None
    kind = next((label for part, label in FOREIGN_PARTS.items() if part in bad[0]), None)
    what = f"{kind}, not LoRA" if kind else f"not an sd-scripts or diffusers LoRA key"
    return (f"network_weights {path}: key '{bad[0]}' is {what} ({len(bad)} such keys); give a LoRA "
            "file written by sd-scripts, kohya_ss, diffusers or this package")


# -- the header, without torch ----------------------------------------------------------------

_SCALAR_FORMATS = {"F32": "<f", "F16": "<e", "F64": "<d"}


def read_header(path: Path) -> tuple[dict, int]:
    """The safetensors JSON header ({key: {dtype, shape, data_offsets}}) and where data starts."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise LoraFileError(f"network_weights {path}: not a safetensors file (too short)")
        size = struct.unpack("<Q", raw)[0]
        if size > 100_000_000:
            raise LoraFileError(f"network_weights {path}: not a safetensors file (bad header)")
        try:
            header = json.loads(f.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise LoraFileError(f"network_weights {path}: not a safetensors file (bad header)") from None
    header.pop("__metadata__", None)
    return header, 8 + size


def read_scalar(path: Path, entry: dict, data_start: int) -> float:
    """A 0-dim (or 1-element) F32 / F16 / F64 / BF16 tensor of the file, as a float."""
    begin, end = entry["data_offsets"]
    with open(path, "rb") as f:
        f.seek(data_start + begin)
        raw = f.read(end - begin)
    if entry["dtype"] == "BF16":  # the upper half of a float32
        return struct.unpack("<f", b"\x00\x00" + raw[:2])[0]
    if entry["dtype"] not in _SCALAR_FORMATS:
        raise LoraFileError(f"network_weights {path}: alpha stored as {entry['dtype']}")
    return struct.unpack(_SCALAR_FORMATS[entry["dtype"]], raw[: struct.calcsize(
        _SCALAR_FORMATS[entry["dtype"]])])[0]


@dataclass(frozen=True)
class LoraFileSummary:
    """What a LoRA file says about its network, read from the header."""

    layout: str  # kohya | diffusers
    components: tuple[str, ...]  # unet, text_encoder, text_encoder_2 (those present)
    sdxl_names: bool  # lora_te1/lora_te2, text_encoder_2 or SGM block names: an SDXL file
    sd1_names: bool  # lora_te_ (one text encoder): an SD1.x/2.x file
    rank: int  # most common rank of the linear and 1x1-conv modules (0: none)
    alpha: float
    conv_rank: int  # most common rank of the 3x3 convolutions (LoCon; 0: none)
    conv_alpha: float
    dora: bool


def _most_common(values: list) -> object:
    counts = Counter(values)
    return max(counts, key=lambda v: (counts[v], -v)) if counts else 0


def summarize_lora_file(path: Path) -> LoraFileSummary:
    """Rank, alpha, conv rank/alpha, DoRA and components of a LoRA file, from its header."""
    header, data_start = read_header(path)
    keys = sorted(header)
    if not keys:
        raise LoraFileError(f"network_weights {path}: the file holds no tensors")
    layout = key_layout(keys)
    problem = unusable_keys_message(path, layout, keys)
    if problem:
        raise LoraFileError(problem)
    modules: dict[tuple[str, str], dict[str, dict]] = {}
    for key in keys:
        k = split_key(key, layout)
        modules.setdefault((k.component, k.name), {})[k.part] = header[key]
    linear, conv = [], []
    with_magnitude = 0
    for (component, name), parts in modules.items():
        if "down" not in parts or "up" not in parts:
            raise LoraFileError(f"network_weights {path}: module '{name}' lacks its "
                                f"{'lora_down/lora_A' if 'down' not in parts else 'lora_up/lora_B'} "
                                "weight")
        shape = parts["down"]["shape"]
        rank = int(shape[0])
        alpha = (read_scalar(path, parts["alpha"], data_start) if "alpha" in parts else float(rank))
        (conv if len(shape) == 4 and tuple(shape[2:]) != (1, 1) else linear).append((rank, alpha))
        with_magnitude += "magnitude" in parts
    if with_magnitude not in (0, len(modules)):
        raise LoraFileError(f"network_weights {path}: only {with_magnitude} of {len(modules)} modules "
                            "carry DoRA magnitudes; a file is all LoRA or all DoRA")
    names = [name for _, name in modules]
    components = tuple(c for c in DIFFUSERS_COMPONENTS if any(m[0] == c for m in modules))
    sdxl = ("text_encoder_2" in components or any(s in n for n in names for s in SGM_BLOCKS)
            or any(k.startswith("lora_te1_") for k in keys))
    return LoraFileSummary(
        layout=layout, components=components, sdxl_names=sdxl,
        sd1_names=any(k.startswith("lora_te_") for k in keys),
        rank=int(_most_common([r for r, _ in linear])),
        alpha=float(_most_common([a for r, a in linear if r == _most_common([r for r, _ in linear])]))
        if linear else 0.0,
        conv_rank=int(_most_common([r for r, _ in conv])),
        conv_alpha=float(_most_common([a for r, a in conv])) if conv else 0.0,
        dora=with_magnitude > 0)


# -- the tensors ------------------------------------------------------------------------------

@dataclass
class LoraModule:
    """One module of a LoRA file: down [r, in(, kh, kw)], up [out, r(, 1, 1)], its alpha, and the
    DoRA magnitude (as stored: [out], [out, 1, ...] or peft's conv [1, out, 1, 1]) or None."""

    down: object
    up: object
    alpha: float
    magnitude: object = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


def load_lora_modules(path: Path) -> dict[str, dict[str, LoraModule]]:
    """{component: {module name: LoraModule}} of a LoRA file (validated by `summarize_lora_file`)."""
    from safetensors.torch import load_file  # here: the header readers above serve --check without torch
    summary = summarize_lora_file(path)
    parts: dict[tuple[str, str], dict] = {}
    for key, tensor in load_file(path).items():
        k = split_key(key, summary.layout)
        parts.setdefault((k.component, k.name), {})[k.part] = tensor
    out: dict[str, dict[str, LoraModule]] = {}
    for (component, name), p in sorted(parts.items()):
        rank = int(p["down"].shape[0])
        alpha = float(p["alpha"]) if "alpha" in p else float(rank)
        out.setdefault(component, {})[name] = LoraModule(p["down"], p["up"], alpha, p.get("magnitude"))
    return out
