"""``aesthetic``: the LAION aesthetic predictor v2 (christophschuhmann/improved-aesthetic-predictor).

    score(image) = head(e / |e|),   e = CLIP ViT-L/14 projected image embedding (768 values)

The head is the predictor's MLP, read from a plain state dict, never by unpickling code:
``.safetensors``, or the published ``.pth`` through ``torch.load(weights_only=True)``. Two
layouts are published, told apart by the indices of their Linear layers in ``layers.N.weight``:

    linear  (sac+logos+ava1-l14-linearMSE.pth)   layers 0, 2, 4, 6, 7: 768-1024-128-64-16-1, no
                                                 activations (the Dropouts in between are inert)
    relu    (ava+logos-l14-reluMSE.pth)          layers 0, 3, 6, 9, 11: the same sizes with a ReLU
                                                 after each of the first four

Folder (``--reward aesthetic=DIR``, or the head file itself with ``clip/`` beside it):

    DIR/sac+logos+ava1-l14-linearMSE.pth   the head (exactly one .pth / .pt / .safetensors here)
    DIR/clip/                             openai/clip-vit-large-patch14 (transformers layout)
"""

from __future__ import annotations

from pathlib import Path

import torch

from .base import RewardError
from .clip import ClipSimilarity
from .registry import PATH_REQUIRED, register_reward

HEAD_SUFFIXES = (".pth", ".pt", ".safetensors")
CLIP_SUBFOLDER = "clip"
# Linear-layer indices of each published head -> whether a ReLU follows each hidden layer.
HEAD_LAYOUTS = {(0, 2, 4, 6, 7): False, (0, 3, 6, 9, 11): True}


def find_head_file(path: Path) -> Path:
    """The head file: ``path`` itself, or the one .pth / .pt / .safetensors file in folder ``path``."""
    if path.is_file():
        return path
    heads = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in HEAD_SUFFIXES)
    if len(heads) != 1:
        found = ", ".join(p.name for p in heads) or "none"
        raise RewardError(f"{path}: expected exactly one aesthetic head file (.pth / .safetensors) "
                          f"in the folder, found {found}; keep one (README 'Reward models')")
    return heads[0]


def read_head_state(path: Path) -> dict[str, torch.Tensor]:
    """The head's tensors by key, without unpickling code."""
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure means: not a plain tensor file
        raise RewardError(f"{path}: cannot read the aesthetic head as plain tensors "
                          f"({type(err).__name__}); use the published .pth state dict or a "
                          f".safetensors file") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RewardError(f"{path}: not a state dict of tensors; use the published head file")
    return state


def head_layers(state: dict[str, torch.Tensor], where: Path) -> tuple[list, bool]:
    """[(weight, bias), ...] in order and whether ReLUs follow the hidden layers; RewardError if
    the keys are not one of the published layouts."""
    indices = tuple(sorted(int(k.split(".")[1]) for k in state
                           if k.startswith("layers.") and k.endswith(".weight")))
    expected_keys = {f"layers.{i}.{p}" for i in indices for p in ("weight", "bias")}
    if indices not in HEAD_LAYOUTS or set(state) != expected_keys:
        raise RewardError(f"{where}: not an aesthetic predictor head (keys "
                          f"{', '.join(sorted(state)[:6])}...; expected layers.0/2/4/6/7 or "
                          f"layers.0/3/6/9/11 .weight/.bias); use the published head file")
    layers = [(state[f"layers.{i}.weight"].float(), state[f"layers.{i}.bias"].float())
              for i in indices]
    for (w_in, _), (w_out, _) in zip(layers, layers[1:]):
        if w_out.shape[1] != w_in.shape[0]:
            raise RewardError(f"{where}: head layer sizes do not chain; the file is damaged")
    if layers[-1][0].shape[0] != 1:
        raise RewardError(f"{where}: the head's last layer has {layers[-1][0].shape[0]} outputs, "
                          f"expected 1")
    return layers, HEAD_LAYOUTS[indices]


def mlp_head(embeddings: torch.Tensor, layers: list, relu: bool) -> torch.Tensor:
    """The head in eval mode: x -> W_k x + b_k through the layers (ReLU between if ``relu``)."""
    x = embeddings
    for index, (weight, bias) in enumerate(layers):
        x = torch.nn.functional.linear(x, weight, bias)
        if relu and index < len(layers) - 1:
            x = torch.relu(x)
    return x[:, 0]


class AestheticPredictor:
    """fn(images, prompts) -> the predicted aesthetic score (prompts are not used)."""

    def __init__(self, path: str, device: torch.device, dtype: torch.dtype = torch.float32):
        path = Path(path)
        head_file = find_head_file(path)
        self.layers, self.relu = head_layers(read_head_state(head_file), head_file)
        self.layers = [(w.to(device), b.to(device)) for w, b in self.layers]
        clip_dir = head_file.parent / CLIP_SUBFOLDER
        if not clip_dir.is_dir():
            raise RewardError(f"{head_file.parent}: no {CLIP_SUBFOLDER}/ folder beside the head; put "
                              f"openai/clip-vit-large-patch14 there (README 'Reward models')")
        self.clip = ClipSimilarity(str(clip_dir), "aesthetic", device, logit_scaled=False,
                                   dtype=dtype)
        width = self.layers[0][0].shape[1]
        projection = self.clip.model.config.projection_dim
        if width != projection:
            raise RewardError(f"{clip_dir}: CLIP gives {projection}-value image embeddings, the "
                              f"head {head_file.name} takes {width}; use CLIP ViT-L/14 there")

    def __call__(self, images, prompts) -> torch.Tensor:
        return mlp_head(self.clip.image_embeddings(images), self.layers, self.relu)


def _aesthetic(path: str, device: torch.device, dtype: torch.dtype = torch.float32):
    return AestheticPredictor(path, device, dtype)


register_reward(
    name="aesthetic", factory=_aesthetic, path=PATH_REQUIRED,
    description="LAION aesthetic predictor v2: MLP head on the CLIP ViT-L/14 image embedding "
                "(prompt not used)",
    path_help="a folder with the head .pth / .safetensors and clip/ = openai/clip-vit-large-patch14")
