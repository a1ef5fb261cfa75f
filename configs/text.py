"""Small wording helpers for one-line messages (so a count of 1 never reads "1 ranks")."""

from __future__ import annotations


def count(n: int, noun: str, plural: str | None = None) -> str:
    """`count(1, "rank")` -> "1 rank", `count(4, "rank")` -> "4 ranks" (`plural` for irregular nouns)."""
    return f"{n} {noun if n == 1 else (plural or noun + 's')}"
