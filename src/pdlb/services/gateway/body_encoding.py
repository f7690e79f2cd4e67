"""A request body's Content-Encoding, decoded by the gateway itself: gzip and deflate, bounded.

aiohttp's own decoding (its default) answered what it cannot decode before any of the gateway's
code ran: `zstd` and `br` without their optional libraries got a plain-text 400 ("Please install
`Brotli`"), an unknown coding was read as if uncompressed, and a corrupt gzip body, refused by the
gateway, was logged once more by aiohttp as an "Unhandled exception" while it drained the rest.
The gateway's HTTP server runs with aiohttp's decoding off (`auto_decompress=False`), and this
module decodes what clients send (`requests`, `curl --compressed` bodies, the `openai` SDK's
gzip): every refusal is the gateway's, in OpenAI's error JSON. Decoding is stdlib zlib; the
decoded body is bounded like the raw one (--max-body-bytes), so a small compressed body cannot
expand without bound.
"""

from __future__ import annotations

import zlib

from pdlb.common.plurals import counted

# Codings this gateway decodes (RFC 9110 8.4.1; x-gzip is gzip's old name); "identity" is no coding.
DECODED = ("gzip", "deflate")
ALIASES = {"x-gzip": "gzip"}
# Accept-Encoding of a 415 (RFC 9110 15.5.16: what the server accepts)
ACCEPTED = "gzip, deflate, identity"
WBITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
GZIP_MAGIC = b"\x1f\x8b"  # the first bytes of every gzip member (RFC 1952 2.3.1)
# a zlib stream's first two bytes at the usual compression levels (RFC 1950 2.2: CM 8, a 32 KiB
# window); none is JSON's first byte, so a JSON body is never taken for one
ZLIB_HEADERS = (b"\x78\x01", b"\x78\x5e", b"\x78\x9c", b"\x78\xda")
MAX_CODINGS = 4  # codings applied in a row: more is no client's doing


class BodyEncodingError(Exception):
    """A body that cannot be decoded: `status` 415 (a coding not supported), 400 (a body its coding
    does not decode) or 413 (it decodes past the bound); the message says which and what to send."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def codings(header: str | None) -> list[str]:
    """The codings a Content-Encoding header lists, in the order they were applied (lowercase,
    identity left out); [] for none. BodyEncodingError 415 naming one not supported."""
    if not header:
        return []
    found = []
    for item in header.split(","):
        name = item.strip().lower()
        name = ALIASES.get(name, name)
        if name in ("", "identity"):
            continue
        if name not in DECODED:
            raise BodyEncodingError(
                415,
                f"Content-Encoding {item.strip()[:40]!r} is not supported: send the body uncompressed, or "
                f"compressed with gzip or deflate (Accept-Encoding: {ACCEPTED})",
            )
        found.append(name)
    if len(found) > MAX_CODINGS:
        raise BodyEncodingError(415, f"Content-Encoding lists {len(found)} codings; at most {MAX_CODINGS}")
    return found


def decode(raw: bytes, applied: list[str], limit: int) -> bytes:
    """`raw` with the codings `applied` (as codings() returns them) undone, last applied first.
    BodyEncodingError 400 when a coding does not decode it (corrupt, cut short, or bytes after the
    end of its stream that are not a further gzip member), 413 when the
    decoded body exceeds `limit` bytes. CPU: about 1 ms per 100 KiB decoded."""
    body = raw
    for name in reversed(applied):
        body = _undo(body, name, limit)
    return body


def _undo(data: bytes, name: str, limit: int) -> bytes:
    out = b""
    while True:  # gzip: one member after another (RFC 1952 2.2), as gzip.decompress reads them
        wbits = WBITS[name]
        if name == "deflate" and data[:1] and (data[0] & 0x0F) != 8:
            wbits = -zlib.MAX_WBITS  # raw deflate without the zlib header: what some clients send as deflate
        if name == "gzip" and not out and data[:2] != GZIP_MAGIC:
            # zlib's words for it were "incorrect header check": most often a plain body labelled gzip
            raise BodyEncodingError(
                400,
                f"the body is not gzip data (Content-Encoding: gzip): it starts with {_shown(data)}, not gzip's "
                f"magic bytes 1f 8b; check the Content-Encoding header (leave it out for a body sent uncompressed)",
            )
        # no zlib header: raw deflate, or (far more often) a body that is not deflate at all
        headless = name == "deflate" and wbits < 0
        not_deflate = BodyEncodingError(
            400,
            f"the body is not deflate data (Content-Encoding: deflate): it starts with {_shown(data)}, neither a "
            f"zlib header nor a raw deflate stream; check the Content-Encoding header (leave it out for a body "
            f"sent uncompressed)",
        )
        inflater = zlib.decompressobj(wbits)
        try:
            out += inflater.decompress(data, limit + 1 - len(out))  # a byte past the bound tells "too large"
        except zlib.error as exc:
            if headless:
                raise not_deflate from None
            raise BodyEncodingError(  # its header was right: the data after it is corrupt
                400, f"the request body is not valid {name} (Content-Encoding: {name}): its data is corrupt ({exc})"
            ) from None
        if len(out) > limit:
            raise BodyEncodingError(
                413, f"the request body decodes ({name}) to more than {limit} bytes (--max-body-bytes)"
            )
        if not inflater.eof and headless:  # plain text read as raw deflate decodes, then runs out
            raise not_deflate
        if not inflater.eof:
            raise BodyEncodingError(
                400, f"the request body ends before its {name} stream does (Content-Encoding: {name}): it was cut short"
            )
        data = inflater.unused_data
        if not data:
            return out
        # Another gzip member starts with the magic bytes; anything else after a stream's end (junk,
        # zero padding) is refused by name, as Python's gzip module and Go's gzip reader refuse it:
        # read as a next member, it was a misleading "not valid gzip: incorrect header check".
        if name != "gzip" or data[:2] != GZIP_MAGIC:
            raise BodyEncodingError(
                400,
                f"the request body has {counted(len(data), 'byte')} after the end of its {name} stream "
                f"(Content-Encoding: {name}): send the compressed stream alone",
            )


def check_decoded(body: bytes, header: str, applied: list[str]) -> None:
    """BodyEncodingError 400 when `body`, with the codings `applied` (codings() of Content-Encoding
    `header`) undone, still starts with a gzip or zlib header: compressed more times than the
    header says, most often by a client that compressed without saying so. Without this the client
    got a JSON or UTF-8 decoding error about bytes it never meant as text."""
    found = "gzip" if body[:2] == GZIP_MAGIC else "zlib (deflate)" if body[:2] in ZLIB_HEADERS else ""
    if not found:
        return
    coding = "gzip" if found == "gzip" else "deflate"
    header = header.strip()[:60]
    if applied:
        said = f"with its Content-Encoding ({header!r}) undone, the body still starts with a {found} header"
        fix = f"list {coding} once for each time the body was compressed"
    else:
        said = f"the body starts with a {found} header but " + (
            f"Content-Encoding is {header!r}" if header else "there is no Content-Encoding header"
        )
        fix = f"send Content-Encoding: {coding} with it, or the body uncompressed"
    raise BodyEncodingError(400, f"{said}: check the Content-Encoding header ({fix})")


def _shown(data: bytes) -> str:
    """The first bytes of a body, as a reader of the error can tell them apart (text or hex)."""
    head = data[:8]
    if head and all(32 <= b < 127 for b in head):
        return repr(head.decode())
    return " ".join(f"{b:02x}" for b in head) if head else "nothing (an empty body)"
