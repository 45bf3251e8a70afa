"""A labelled before/after grid: one column per sample, rows "base" and "tuned", the prompt under
each column (wrapped), written atomically as PNG."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..utils.io import atomic_write_bytes

CELL = 128  # pixels per image cell (small images are upscaled with nearest, large ones shrunk)
LABEL_WIDTH = 48
TEXT_LINES = 4


def _cell(image: Image.Image) -> Image.Image:
    image = image.convert("RGB")
    resample = Image.NEAREST if max(image.size) < CELL else Image.BICUBIC
    return image.resize((CELL, CELL), resample)


def save_labelled_grid(base, tuned, prompts: list[str], path: str | Path, columns: int = 8) -> Path:
    """``base`` / ``tuned``: samples (``.frames``; a clip shows its first frame) of the same
    prompts; the first ``columns`` are drawn."""
    count = min(columns, len(base), len(tuned), len(prompts))
    if count == 0:
        raise ValueError("save_labelled_grid: no samples")
    font = ImageFont.load_default()
    line_height = 11
    text_height = TEXT_LINES * line_height + 4
    grid = Image.new("RGB", (LABEL_WIDTH + count * CELL, 2 * CELL + text_height), "white")
    draw = ImageDraw.Draw(grid)
    for row, (label, samples) in enumerate((("base", base), ("tuned", tuned))):
        draw.text((4, row * CELL + CELL // 2 - 5), label, fill="black", font=font)
        for col in range(count):
            grid.paste(_cell(samples[col].frames[0]), (LABEL_WIDTH + col * CELL, row * CELL))
    for col, prompt in enumerate(prompts[:count]):
        lines = textwrap.wrap(prompt, width=CELL // 6)[:TEXT_LINES]
        for i, line in enumerate(lines):
            draw.text((LABEL_WIDTH + col * CELL + 2, 2 * CELL + 2 + i * line_height), line,
                      fill="black", font=font)
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    return atomic_write_bytes(path, buffer.getvalue())
