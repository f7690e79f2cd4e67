"""Headless Chromium driven over the DevTools protocol (aiohttp's WebSocket client): open a page,
evaluate JavaScript in it, take screenshots. Used by the dashboard tests."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import aiohttp

from pdlb.common.free_port import free_port


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


class Browser:
    def __init__(self, width: int = 1400, height: int = 900) -> None:
        self.width, self.height = width, height
        self.port = free_port()
        self.profile = tempfile.mkdtemp(prefix="pdlb-chromium-")
        self.proc: subprocess.Popen | None = None
        self.session: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)

    async def start(self) -> Browser:
        binary = chromium_path()
        assert binary, "chromium is not installed"
        self.proc = subprocess.Popen(  # noqa: ASYNC220 - starting it does not block
            [
                binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                f"--remote-debugging-port={self.port}", f"--user-data-dir={self.profile}",
                f"--window-size={self.width},{self.height}", "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.session = aiohttp.ClientSession()
        for _ in range(200):  # the DevTools endpoint appears once the browser is up
            try:
                async with self.session.get(f"http://127.0.0.1:{self.port}/json/list") as reply:
                    pages = [t for t in await reply.json() if t["type"] == "page"]
                if pages:
                    break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
        else:
            raise RuntimeError("chromium's DevTools endpoint did not come up")
        self.ws = await self.session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=64 << 20)
        await self.call("Page.enable")
        await self.call("Runtime.enable")
        return self

    async def call(self, method: str, **params) -> dict:
        assert self.ws is not None
        ident = next(self._ids)
        await self.ws.send_str(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            message = json.loads((await self.ws.receive()).data)
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    async def open(self, url: str) -> None:
        await self.call("Page.navigate", url=url)

    async def eval(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    async def screenshot(self, path: Path) -> None:
        shot = await self.call("Page.captureScreenshot", format="png")
        await asyncio.to_thread(path.write_bytes, base64.b64decode(shot["data"]))

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.session is not None:
            await self.session.close()
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)
