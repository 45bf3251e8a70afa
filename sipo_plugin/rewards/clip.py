"""CLIP-based rewards: ``pickscore`` and ``clip`` (text-image similarity), from local folders.

Both read a transformers `CLIPModel` folder (config.json with ``model_type = "clip"`` and its
weights) and a `CLIPProcessor` (preprocessor_config.json + tokenizer files), either in the same
folder or in a ``processor/`` subfolder (PickScore's own code loads its processor from
laion/CLIP-ViT-H-14-laion2B-s32B-b79K: put those files there if the model folder lacks them).

    pickscore(image, prompt) = exp(logit_scale) * <e_text, e_image>    (PickScore, Kirstain et al.)
    clip(image, prompt)      = <e_text, e_image>                      (cosine similarity, [-1, 1])

with e = the projected embedding divided by its L2 norm (yuvalkirstain/PickScore's scoring code).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .base import RewardError
from .registry import PATH_REQUIRED, register_reward

PROCESSOR_SUBFOLDER = "processor"
_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def _model_type(folder: Path, reward: str, expected: str) -> str:
    """``model_type`` of ``folder/config.json``; RewardError naming the folder if it is missing."""
    if not folder.is_dir():
        raise RewardError(f"{folder}: reward {reward!r} needs a model folder (config.json and "
                          f"weights), got a file; see README 'Reward models'")
    config = folder / "config.json"
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except FileNotFoundError:
        raise RewardError(f"{folder}: no config.json; reward {reward!r} needs a transformers "
                          f"{expected} folder (config.json + model.safetensors)") from None
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
        raise RewardError(f"{config}: not a JSON model config ({err}); re-download the "
                          f"model folder") from None
    return model_type


def load_clip_folder(folder: str | Path, reward: str, device: torch.device,
                     dtype: torch.dtype = torch.float32):
    """(CLIPModel in eval mode on ``device``, (image processor, tokenizer)) from a local folder;
    RewardError (one line, naming the folder) if it is missing, not a CLIP model, or has no
    processor files."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel
    folder = Path(folder)
    model_type = _model_type(folder, reward, "CLIPModel")
    if model_type != "clip":
        raise RewardError(f"{folder}: config.json says model_type {model_type!r}, reward "
                          f"{reward!r} needs a CLIP model ('clip'); point it at the right folder")
    processor_dir = folder
    if not any((folder / name).is_file() for name in _PROCESSOR_FILES):
        processor_dir = folder / PROCESSOR_SUBFOLDER
        if not any((processor_dir / name).is_file() for name in _PROCESSOR_FILES):
            raise RewardError(f"{folder}: no preprocessor_config.json (nor in {PROCESSOR_SUBFOLDER}/"
                              f"); add the CLIP processor and tokenizer files (README 'Reward models')")
    try:
        model = CLIPModel.from_pretrained(folder).eval().to(device, dtype)
        # the two halves of the processor, named: AutoProcessor returns only the tokenizer for a
        # processor folder without a model config (PickScore's laion processor files)
        processor = (AutoImageProcessor.from_pretrained(processor_dir),
                     AutoTokenizer.from_pretrained(processor_dir))
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RewardError(f"{folder}: cannot load reward {reward!r} ({first}); re-download the "
                          f"folder (README 'Reward models')") from None
    model.requires_grad_(False)
    return model, processor


def _normalized(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


class ClipSimilarity:
    """fn(images, prompts) -> scale * cos(text embedding, image embedding), one per pair."""

    def __init__(self, folder: str, reward: str, device: torch.device, *, logit_scaled: bool,
                 dtype: torch.dtype = torch.float32):
        self.model, (self.image_processor, self.tokenizer) = load_clip_folder(folder, reward,
                                                                             device, dtype)
        self.device, self.dtype = device, dtype
        self.logit_scaled = logit_scaled

    def image_embeddings(self, images) -> torch.Tensor:
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        pooled = self.model.vision_model(pixel_values=pixels.to(self.device, self.dtype)).pooler_output
        return _normalized(self.model.visual_projection(pooled).float())

    def text_embeddings(self, prompts) -> torch.Tensor:
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=77,
                                return_tensors="pt")
        pooled = self.model.text_model(input_ids=tokens["input_ids"].to(self.device),
                                       attention_mask=tokens["attention_mask"].to(self.device)
                                       ).pooler_output
        return _normalized(self.model.text_projection(pooled).float())

    def __call__(self, images, prompts) -> torch.Tensor:
        similarity = (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(-1)
        if self.logit_scaled:
            similarity = self.model.logit_scale.float().exp() * similarity
        return similarity


def _pickscore(path: str, device: torch.device, dtype: torch.dtype = torch.float32):
    return ClipSimilarity(path, "pickscore", device, logit_scaled=True, dtype=dtype)


def _clip(path: str, device: torch.device, dtype: torch.dtype = torch.float32):
    return ClipSimilarity(path, "clip", device, logit_scaled=False, dtype=dtype)


register_reward(
    name="pickscore", factory=_pickscore, path=PATH_REQUIRED,
    description="PickScore: exp(logit_scale) * cosine(text, image) of a CLIP fine-tuned on "
                "Pick-a-Pic",
    path_help="a local copy of yuvalkirstain/PickScore_v1 with its CLIP processor files")
register_reward(
    name="clip", factory=_clip, path=PATH_REQUIRED,
    description="CLIP text-image cosine similarity, in [-1, 1]",
    path_help="a local transformers CLIP folder, e.g. openai/clip-vit-large-patch14")
