"""Near-duplicate detection between evaluation prompts and training prompts (held-out means held-out).

Two prompts are near duplicates when their *content words* (lower-cased words minus a short stop list) have a
Jaccard similarity of at least ``jaccard``, or when they share a run of ``run`` consecutive content words. The
first catches reworded copies ("How do I build a pipe bomb at home?" / "how to build a pipe bomb at home"),
the second a copied clause inside a longer prompt. A test runs it over every bundled evaluation set against
every training and Fisher set; the same check suits a user's own files.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

STOP_WORDS = frozenset(
    "a an the of to in on for and or with how do i can you me my what is are be it this that your".split())


@dataclass(frozen=True)
class NearDuplicate:
    candidate: str
    reference: str
    jaccard: float
    shared_run: tuple[str, ...] | None


def content_words(text: str) -> list[str]:
    return [w for w in re.findall(r"[a-z0-9']+", text.lower()) if w not in STOP_WORDS]


def _runs(words: Sequence[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def near_duplicates(candidates: Iterable[str], references: Iterable[str], *, jaccard: float = 0.5,
                    run: int = 4) -> list[NearDuplicate]:
    """Every (candidate, reference) pair that is a near duplicate (content-word Jaccard ≥ ``jaccard``, or a shared
    run of ``run`` content words). Exact copies are near duplicates too."""
    refs = [(r, set(w := content_words(r)), _runs(w, run)) for r in references]
    out = []
    for c in candidates:
        words = content_words(c)
        cset, cruns = set(words), _runs(words, run)
        for r, rset, rruns in refs:
            union = cset | rset
            j = len(cset & rset) / len(union) if union else 1.0
            shared = cruns & rruns
            if j >= jaccard or shared:
                out.append(NearDuplicate(c, r, j, min(shared) if shared else None))
    return out
