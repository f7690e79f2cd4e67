"""A bounded count of concurrent calls: past the bound a caller is refused at once (the service
answers RESOURCE_EXHAUSTED or HTTP 429) instead of queueing without limit."""

from __future__ import annotations


class Slots:
    def __init__(self, what: str, limit: int, flag: str) -> None:
        self.what, self.limit, self.flag, self.used = what, limit, flag, 0

    def try_acquire(self) -> bool:
        if self.used >= self.limit:
            return False
        self.used += 1
        return True

    def release(self) -> None:
        self.used -= 1

    def refusal(self) -> str:
        """Why a caller was refused, naming the flag that sets the bound."""
        return f"{self.used} {self.what} ({self.flag}={self.limit})"
