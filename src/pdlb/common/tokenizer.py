"""Byte-level tokenizer: UTF-8 bytes are token ids 0..255; ids from 256 up are special."""

from __future__ import annotations

import codecs

BYTE_VOCAB = 256
EOS_TOKEN_ID = 256
MIN_VOCAB_SIZE = BYTE_VOCAB + 1


def encode(text: str) -> list[int]:
    """Token ids of `text`: its UTF-8 bytes."""
    return list(text.encode("utf-8"))


class StreamDecoder:
    """Decodes token ids to text incrementally, holding back incomplete UTF-8 sequences."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_ids: list[int]) -> str:
        return self._decoder.decode(bytes(t for t in token_ids if 0 <= t < BYTE_VOCAB))


def decode(token_ids: list[int]) -> str:
    """Text of complete token ids (special ids dropped, invalid UTF-8 replaced)."""
    return bytes(t for t in token_ids if 0 <= t < BYTE_VOCAB).decode("utf-8", errors="replace")
