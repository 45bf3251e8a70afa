"""The pair data's check before training: every image decodes (no torch needed)."""

from __future__ import annotations

from collections.abc import Sequence

from tqdm.auto import tqdm

from .errors import PairDataError
from .readers import PairRecord
from .sources import ImageReader


def undecodable_images(records: Sequence[PairRecord], *, desc: str = "checking images") -> list[str]:
    """Decode every distinct image of ``records`` once (a progress bar); one problem line per image
    that is missing, corrupt, too large or otherwise unreadable, in the data's order."""
    reader, seen, problems = ImageReader(), set(), []
    sources = [s for r in records for s in (r.chosen, r.rejected)]
    for source in tqdm(sources, desc=desc, unit="image", leave=False, dynamic_ncols=True):
        if source in seen:
            continue
        seen.add(source)
        try:
            reader.open(source)
        except PairDataError as err:
            problems.append(str(err))
    return problems


def check_images(records: Sequence[PairRecord]) -> None:
    """PairDataError (one line: how many, the first) unless every image decodes."""
    problems = undecodable_images(records)
    if problems:
        more = f" (and {len(problems) - 1} more: run --check --deep to list them)" if len(problems) > 1 else ""
        raise PairDataError(problems[0] + more)
