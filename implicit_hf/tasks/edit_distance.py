"""Word-level edit distance between two texts: the size of a text perturbation and of the change it causes."""

from __future__ import annotations


def word_edit_distance(a: str, b: str) -> int:
    """Levenshtein distance between the whitespace-separated words of ``a`` and ``b`` (inserting,
    deleting or substituting one word costs 1)."""
    x, y = a.split(), b.split()
    previous = list(range(len(y) + 1))
    for i, word in enumerate(x, start=1):
        current = [i]
        for j, other in enumerate(y, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (word != other)))
        previous = current
    return previous[-1]
