"""How stored vectors are compared, and which comparison a search uses by default.

`SIMILARITIES` (as `encoder.embedder.SIMILARITIES`): the combined score as stored, the
pair part alone (the same eye across modalities), the clinical part alone (the same
disease); an encoder without a clinical part supports "pair" only. Plain functions, no
model: the search, the suggestion and the evaluation share them.
"""

from __future__ import annotations

from collections.abc import Sequence

from retrieval.errors import QueryError

SIMILARITIES = ("combined", "pair", "clinical")


def default_similarity(supported: Sequence[str]) -> str:
    """The similarity a search uses when none is asked for, for every query type:
    "clinical" (the same disease), or "pair" for an encoder without a clinical part.
    Measured on held-out phantom patients, "combined" lost to one of the two parts on
    every metric (CF→FFA R@1 0.76 against the pair part's 0.95, precision@10 0.81
    against the clinical part's 0.84), so it is never the default; "pair" is the choice
    that finds a photo's own angiogram."""
    for kind in ("clinical", "pair", *supported):
        if kind in supported:
            return kind
    raise ValueError(f"the encoder supports no similarity (got {tuple(supported)})")


def check_similarity(similarity: str, supported: Sequence[str]) -> str:
    """`similarity` when the encoder supports it, else a QueryError naming the allowed ones."""
    if similarity not in supported:
        raise QueryError(
            f"similarity must be one of {', '.join(supported)} for this index's encoder, "
            f"got {similarity!r}"
        )
    return similarity
