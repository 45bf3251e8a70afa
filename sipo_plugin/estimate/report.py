"""The --estimate report: one line per part, the activations by pairs and resolution, and whether
the run fits in each --vram size."""

from __future__ import annotations

from .estimate import CUDA_CONTEXT_BYTES, GIB, Estimate


def gib(n: int) -> str:
    return f"{n / GIB:8.3f} GiB"


def fits_line(total: int, vram_gb: float) -> str:
    """'fits' when total + the CUDA context (CUDA_CONTEXT_BYTES) <= vram_gb GiB."""
    need = total + CUDA_CONTEXT_BYTES
    verdict = "fits" if need <= vram_gb * GIB else "does NOT fit"
    return (f"  {vram_gb:g} GB: {verdict} ({need / GIB:.2f} GiB with "
            f"{CUDA_CONTEXT_BYTES / GIB:.1f} GiB CUDA context = {need / (vram_gb * GIB):.0%})")


def format_estimate(result: Estimate, vram: list[float]) -> str:
    lines = [f"memory estimate ({result.source})",
             f"trained parameters: {result.trained_params:,}", ""]
    width = max(len(p.name) for p in result.parts)
    for place in ("device", "host"):
        shown = [p for p in result.parts if p.place == place]
        lines.append(f"on the {'accelerator (GPU)' if place == 'device' else 'host (CPU memory)'}:")
        lines += [f"  {p.name:<{width}} {gib(p.bytes)}  {p.detail}".rstrip() for p in shown]
    activations = result.run_activations()
    mode = "with" if result.checkpointing else "without"
    lines.append(f"  {'activations':<{width}} {gib(activations)}  {result.pairs} pairs "
                 f"({2 * result.pairs} images) at {result.resolution} px, {mode} gradient "
                 "checkpointing (calibrated estimate)")
    lines.append(f"  {'total on the accelerator':<{width}} {gib(result.device_bytes())}")
    lines += ["", "activations (estimate) by pairs per micro-batch and resolution:",
              "  pairs  resolution  checkpointing off  checkpointing on"]
    for pairs, resolution in sorted({(k[0], k[1]) for k in result.activations}):
        lines.append(f"  {pairs:5d}  {resolution:10d}  {gib(result.activations[(pairs, resolution, False)])}"
                     f"     {gib(result.activations[(pairs, resolution, True)])}")
    if vram:
        lines += ["", "fits in --vram:"] + [fits_line(result.device_bytes(), v) for v in vram]
    lines += [f"note: {n}" for n in result.notes]
    lines.append("weights, gradients, optimizer states and reference are exact; activations are "
                 "a calibrated estimate (README, 'Memory')")
    return "\n".join(lines)
