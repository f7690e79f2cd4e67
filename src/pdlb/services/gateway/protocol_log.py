"""The log of aiohttp's HTTP protocol layer in the gateway: requests aiohttp itself refused.

A request aiohttp cannot parse (a garbled request line, a duplicated Content-Type or Content-Length,
a bad Content-Length, broken chunked framing, an over-long line) never reaches the application: its
middlewares and signals do not run, and aiohttp answers 400 with its own plain-text reason (it
offers no public hook to shape that body: aio-libs/aiohttp#3287; the README says what is answered).
What the gateway controls is its log: aiohttp logs each such request as an ERROR with the parser's
traceback, a dozen lines any client can cause at will. Here it is one INFO line with
aiohttp's reason, as web servers log a client's bad request; a client that goes away while it
sends its body (an ERROR traceback too) is one DEBUG line (the request counts as 499 in the
metrics); every other error aiohttp logs keeps its traceback.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web import RequestPayloadError

REASON_CHARS = 300  # aiohttp's reason quotes the client's bytes (up to a whole 8190-byte line)


class ProtocolLog(logging.LoggerAdapter):
    """aiohttp's `logger` for the gateway's HTTP server (AppRunner's `logger=`): its records go to
    `logger` (default `aiohttp.server`)."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        super().__init__(logger or logging.getLogger("aiohttp.server"), {})

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kwargs: Any) -> None:
        text = str(msg) % args if args else str(msg)
        # aiohttp's body stream raises a RequestPayloadError caused by the parser's error
        fault = exc_info.__cause__ if isinstance(exc_info, RequestPayloadError) else exc_info
        if isinstance(fault, HttpProcessingError):
            reason = " ".join(str(fault.message).split())[:REASON_CHARS]  # one line, bounded
            self.info("%s: malformed HTTP request: %s", text, reason, **kwargs)
        elif isinstance(exc_info, ConnectionError):  # the client left while sending its body: no fault here
            self.debug("%s: the client went away (%s)", text, exc_info, **kwargs)
        else:
            super().exception(msg, *args, exc_info=exc_info, **kwargs)
