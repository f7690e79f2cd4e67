"""Stop strings, matched on the detokenised text as it streams."""

from __future__ import annotations


class StopMatcher:
    """Holds back the tail of the text that could still become a stop string, so the client never
    sees a stop string or a part of one; the text before the first match is released."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.pending = ""
        self.matched: str | None = None  # the stop string that ended the text, once one did

    def push(self, text: str) -> tuple[str, bool]:
        """Text safe to release now, and whether a stop string was found (generation ends)."""
        if not self.stops:
            return text, False
        self.pending += text
        hits = [i for i in (self.pending.find(stop) for stop in self.stops) if i >= 0]
        if hits:
            at = min(hits)
            self.matched = next(stop for stop in self.stops if self.pending.find(stop) == at)
            released, self.pending = self.pending[:at], ""
            return released, True
        keep = max((_overlap(self.pending, stop) for stop in self.stops), default=0)
        cut = len(self.pending) - keep
        released, self.pending = self.pending[:cut], self.pending[cut:]
        return released, False

    def flush(self) -> str:
        released, self.pending = self.pending, ""
        return released


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for size in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:size]):
            return size
    return 0
