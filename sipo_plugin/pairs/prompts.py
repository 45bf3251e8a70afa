"""Prompt files for `sipo-pairs sample` and the evaluation: one prompt a line, or JSONL.

    prompts.txt     one prompt a line (blank lines and lines starting with '#' are skipped)
    prompts.jsonl   {"prompt": "...", "negative_prompt": "..."} a line (negative_prompt optional)
    a name          a registered prompt set (`register_prompt_set`; the toy world's "toy": its
                    54 prompts, sipo_plugin/toy/domain.py)
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..utils.plugins import load_registrations

_PROMPT_SETS: dict[str, Callable[[], list[str]]] = {}


class PromptFileError(ValueError):
    """A prompt file that cannot be read; the message is one line naming the file and the fix."""


@dataclass(frozen=True)
class PromptEntry:
    prompt: str
    negative_prompt: str = ""


def register_prompt_set(name: str, prompts: Callable[[], list[str]]) -> None:
    """``name`` (in pairs_prompts / eval_prompts) stands for the prompts ``prompts()`` returns."""
    if _PROMPT_SETS.get(name, prompts) is not prompts:
        raise ValueError(f"prompt set '{name}' is already registered")
    _PROMPT_SETS[name] = prompts


def prompt_set(name: str) -> Callable[[], list[str]] | None:
    """The registered prompt set ``name`` stands for (None: ``name`` is a file)."""
    load_registrations()
    return _PROMPT_SETS.get(name)


def read_prompts(source: str | os.PathLike) -> list[PromptEntry]:
    """Every prompt of a .txt / .jsonl file (or of a registered prompt set), in file order."""
    named = prompt_set(str(source))
    if named is not None:
        return [PromptEntry(p) for p in named()]
    path = Path(source)
    if not path.is_file():
        raise PromptFileError(f"{path}: prompt file not found (a .txt with one prompt a line, "
                              "or a .jsonl with 'prompt' and optional 'negative_prompt')")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise PromptFileError(f"{path}: not UTF-8 text (byte {err.start}); re-save the file as "
                              "UTF-8") from None
    entries = (_jsonl_entries(path, text) if path.suffix.lower() == ".jsonl"
               else [PromptEntry(line.strip()) for line in text.splitlines()
                     if line.strip() and not line.lstrip().startswith("#")])
    if not entries:
        raise PromptFileError(f"{path}: no prompts in the file; write one prompt a line (.txt) "
                              "or one {\"prompt\": ...} object a line (.jsonl)")
    return entries


def _jsonl_entries(path: Path, text: str) -> list[PromptEntry]:
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise PromptFileError(f"{path}:{number}: malformed JSON ({err.msg}); write one "
                                  "{\"prompt\": ...} object a line") from None
        prompt = row.get("prompt") if isinstance(row, dict) else None
        negative = row.get("negative_prompt", "") if isinstance(row, dict) else ""
        if not isinstance(prompt, str) or not prompt.strip() or not isinstance(negative, str):
            raise PromptFileError(f"{path}:{number}: needs a non-empty string 'prompt' (and a "
                                  "string 'negative_prompt' if given)")
        entries.append(PromptEntry(prompt.strip(), negative))
    return entries


def cycle_prompts(entries: list[PromptEntry], count: int) -> list[PromptEntry]:
    """``count`` entries taken in order and cycled (0: each entry once)."""
    if count <= 0:
        return list(entries)
    return [entries[i % len(entries)] for i in range(count)]
