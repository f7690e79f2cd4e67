"""Counts in the messages people read: "1 token", "2 tokens", never "1 tokens"."""

from __future__ import annotations


def counted(count: int, noun: str, plural: str = "") -> str:
    """`count` and its noun, plural unless `count` is 1: counted(1, "token") == "1 token",
    counted(0, "token") == "0 tokens"; `plural` for a noun not made plural by an "s"
    (counted(2, "retry", "retries") == "2 retries")."""
    return f"{count} {noun if count == 1 else plural or noun + 's'}"
