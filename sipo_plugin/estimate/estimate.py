"""``train_sipo.py --preset P --estimate [--vram 8 12 24]``: the memory a run needs, before it starts.

The weights, trained parameters, gradients, optimizer states and the reference are exact: the run's
model is built on the meta device through the trainer's own code (build.py) and the optimizer state
is counted from the trained parameters' shapes and dtypes (states.py; a test compares each with the
tensors a real step allocates). The activations are calibrated (activations.py). The caches
(latents, text-encoder outputs, cached reference errors) live in host memory or on disk.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .activations import activation_bytes, saved_activation_bytes
from .build import EstimateError
from .states import ParamShape, effective_optimizer, gradient_bytes, optimizer_state_bytes

GIB = 2**30
CUDA_CONTEXT_BYTES = GIB // 2  # CUDA context + kernels: used, never in max_memory_allocated
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
               torch.int64: "int64", torch.uint8: "uint8"}


@dataclass
class Part:
    name: str
    bytes: int
    place: str  # "device", "host" (CPU memory) or "disk"
    detail: str = ""


@dataclass
class Estimate:
    source: str
    trained_params: int
    parts: list[Part]
    pairs: int
    resolution: int
    checkpointing: bool
    # (pairs, resolution, gradient checkpointing) -> activation bytes
    activations: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def run_activations(self) -> int:
        return self.activations[(self.pairs, self.resolution, self.checkpointing)]

    def device_bytes(self) -> int:
        """What the run allocates on the accelerator (torch.cuda.max_memory_allocated's view)."""
        return sum(p.bytes for p in self.parts if p.place == "device") + self.run_activations()


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def tensor_bytes(tensors) -> dict[torch.dtype, tuple[int, int]]:
    """{dtype: (elements, bytes)} over ``tensors``."""
    out: dict = {}
    for t in tensors:
        n, b = out.get(t.dtype, (0, 0))
        out[t.dtype] = (n + t.numel(), b + t.numel() * t.element_size())
    return out


def weight_parts(components: dict, trained: set[int], released: set[str]) -> list[Part]:
    """One part per component and dtype, trained weights apart (every parameter and buffer)."""
    parts = []
    for name, module in components.items():
        if not isinstance(module, torch.nn.Module):
            continue
        place = "host" if name in released else "device"
        frozen = [p for p in module.parameters() if id(p) not in trained] + list(module.buffers())
        for label, tensors in (("", frozen),
                               (" trained", [p for p in module.parameters() if id(p) in trained])):
            for dtype, (n, b) in tensor_bytes(tensors).items():
                parts.append(Part(f"weights: {name}{label} ({dtype_name(dtype)})", b, place,
                                  f"{n:,} elements" + (" (released after caching)"
                                                      if place == "host" else "")))
    return parts


def param_shapes(adapter, params: list[torch.nn.Parameter], fresh_lora: bool) -> list[ParamShape]:
    """The trained parameters as states.py reads them (a fresh LoRA's up matrices start at 0)."""
    names = {id(p): n for m in adapter.trainable_modules() for n, p in m.named_parameters()}
    return [ParamShape(tuple(p.shape), p.element_size(),
                       fresh_lora and "lora_B" in names.get(id(p), "")) for p in params]


def reference_parts(config, reference, pairs_in_data: int | None) -> list[Part]:
    """The frozen copy (its device), the cached errors (host + file), or nothing."""
    from ..training.reference import FrozenCopyReference, objective_needs_reference
    t = config.training
    if not objective_needs_reference(config):
        return [Part("reference: none", 0, "device", f"'{config.objective.name}' needs none")]
    if isinstance(reference, FrozenCopyReference):
        place = "host" if t.reference_device.startswith("cpu") else "device"
        dtypes = tensor_bytes([*reference.module.parameters(), *reference.module.buffers()])
        return [Part(f"reference: frozen copy ({dtype_name(d)})", b, place, f"{n:,} elements")
                for d, (n, b) in dtypes.items()]
    if t.reference == "cached":
        pairs = pairs_in_data or 1000
        per_pair = t.reference_cache_draws * (2 * 4 + 8)  # errors [K, 2] fp32 + timesteps [K] int64
        where = f"{pairs:,} pairs" + ("" if pairs_in_data else " (data not read: per 1,000 pairs)")
        return [Part("reference: cached errors", pairs * per_pair, "host",
                     f"{where} x {t.reference_cache_draws} draws; the same on disk")]
    return [Part("reference: adapter off", 0, "device", "the base weights with the LoRA off")]


def cache_parts(config, adapter, pairs_in_data: int | None) -> list[Part]:
    """Cached latents (fp32, 2 per pair) and text-encoder outputs (one row per distinct prompt;
    counted as one prompt per pair, an upper bound)."""
    d, unet = config.data, adapter.denoiser
    pairs = pairs_in_data or 1000
    where = f"{pairs:,} pairs" + ("" if pairs_in_data else " (data not read: per 1,000 pairs)")
    parts = []
    if d.cache_latents or d.cache_latents_to_disk:
        side = d.resolution // latent_factor(adapter)
        per_pair = 2 * unet.config.in_channels * side * side * 4
        parts.append(Part("cache: latents (fp32)", pairs * per_pair, "host",
                          where + ("; the same on disk" if d.cache_latents_to_disk else "")))
    if d.cache_text_encoder_outputs:
        element = torch.empty(0, dtype=adapter.text_encoder.dtype).element_size()
        per_prompt = (77 * unet.config.cross_attention_dim + _pooled_width(unet)) * element
        parts.append(Part(f"cache: text-encoder outputs ({dtype_name(adapter.text_encoder.dtype)})",
                          pairs * per_prompt, "host", where + ", one prompt per pair at most"))
    return parts


def latent_factor(adapter) -> int:
    """Pixels per latent side: 2^(VAE levels - 1) (8 for SD1.5 and SDXL)."""
    return 2 ** (len(adapter.vae.config.block_out_channels) - 1)


def _pooled_width(unet) -> int:
    """SDXL's pooled text embedding width (0 without text_time conditioning)."""
    c = unet.config
    if c.get("addition_embed_type") != "text_time":
        return 0
    return c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim


def meta_conditioning(unet, images: int) -> dict:
    """The [2B] conditioning the adapter's predict reads, on the meta device."""
    dtype = unet.dtype
    cond = {"encoder_hidden_states": torch.empty(images, 77, unet.config.cross_attention_dim,
                                                 device="meta", dtype=dtype)}
    pooled = _pooled_width(unet)
    if pooled:
        cond["text_embeds"] = torch.empty(images, pooled, device="meta", dtype=dtype)
        cond["time_ids"] = torch.empty(images, 6, device="meta", dtype=dtype)
    return cond


def activation_table(config, adapter, resolutions: list[int], calibration: dict | None = None
                     ) -> dict:
    """(pairs, resolution, checkpointing) -> bytes, from one meta forward of one pair per
    resolution (saved activations scale with the images: S(B pairs) = B * S(1 pair));
    ``calibration`` {"slope": 1, "intercept_bytes": 0} gives the saved bytes themselves."""
    compute = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.training.mixed_precision)
    unet = adapter.denoiser
    if compute is not None:  # autocast computes in half precision: count its activations so
        unet.to(compute)
    modules = [m for m in (adapter.denoiser, getattr(adapter, "text_encoder", None)) if m is not None]
    batch = config.training.train_batch_size
    table = {}
    for resolution in resolutions:
        side = resolution // latent_factor(adapter)
        noisy = torch.empty(2, unet.config.in_channels, side, side, device="meta", dtype=unet.dtype)
        timesteps = torch.zeros(2, dtype=torch.long, device="meta")
        cond = meta_conditioning(unet, 2)

        def forward(noisy=noisy, timesteps=timesteps, cond=cond):
            return adapter.predict(noisy, timesteps, cond)

        saved = saved_activation_bytes(forward, modules, unet)
        for pairs in sorted({1, batch, 2 * batch}):
            table[(pairs, resolution, False)] = activation_bytes(pairs * saved.plain, calibration)
            table[(pairs, resolution, True)] = activation_bytes(pairs * saved.checkpointed,
                                                                calibration)
    return table


def count_pairs(config) -> int | None:
    """Pairs in train_data when it can be read now (None: not yet, e.g. made by [pairs])."""
    from pathlib import Path
    if not config.data.train_data or not Path(config.data.train_data).exists():
        return None
    try:
        from ..data import read_pairs
        return len(read_pairs(config.data.train_data,
                              caption_extension=config.data.caption_extension))
    except (OSError, ValueError):
        return None


def estimate(config, resolutions: list[int] | None = None, calibration: dict | None = None
             ) -> Estimate:
    """The memory estimate of ``config`` (a validated Config, or Config.unchecked when only its
    model or data paths are missing)."""
    from ..training.memory import optimizer_kwargs
    from .build import architecture_of, meta_components, meta_run
    t, d = config.training, config.data
    if d.num_frames:
        raise EstimateError(f"--estimate: video families ({config.model.family}) are not "
                            "estimated yet; sd15 and sdxl are")
    architecture, source = architecture_of(config)
    components = meta_components(architecture)
    adapter, params, reference = meta_run(config, components)
    pairs_in_data = count_pairs(config)
    released = (({"vae"} if d.cache_latents or d.cache_latents_to_disk else set())
                | (set(adapter.frozen_encoder_names) if d.cache_text_encoder_outputs else set()))
    adapter_components = {name: getattr(adapter, name) for name in components
                          if isinstance(getattr(adapter, name, None), torch.nn.Module)}
    trained = {id(p) for p in params}
    shapes = param_shapes(adapter, params, fresh_lora=not config.network.network_weights)
    optimizer = effective_optimizer(t.optimizer_type)
    on_device, on_host = optimizer_state_bytes(shapes, optimizer, optimizer_kwargs(t))
    parts = [*weight_parts(adapter_components, trained, released),
             Part("gradients", gradient_bytes(shapes), "device",
                  f"{sum(p.numel for p in shapes):,} trained parameters"),
             Part(f"optimizer states ({optimizer})", on_device, "device"),
             Part("optimizer step counters", on_host, "host"),
             *reference_parts(config, reference, pairs_in_data),
             *cache_parts(config, adapter, pairs_in_data)]
    resolutions = sorted({d.resolution, *(resolutions or [])})
    result = Estimate(source=source, trained_params=sum(p.numel for p in shapes), parts=parts,
                      pairs=t.train_batch_size, resolution=d.resolution,
                      checkpointing=t.gradient_checkpointing,
                      activations=activation_table(config, adapter, resolutions, calibration))
    if optimizer != t.optimizer_type:
        result.notes.append(f"{t.optimizer_type} needs bitsandbytes (not installed): counted as "
                            "torch AdamW, as the run would fall back")
    return result

