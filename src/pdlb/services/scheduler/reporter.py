"""Streams this worker's load to every dispatcher of its role: on change and at least every interval."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import grpc

from pdlb.common.membership import Backoff, Change, PrefixWatch, dispatchers_prefix
from pdlb.common.security import open_channel
from pdlb.engines.kv_events import KVEventLog
from pdlb.v1 import common_pb2, load_report_pb2, load_report_pb2_grpc

log = logging.getLogger(__name__)
MIN_GAP_S = 0.005  # coalesce bursts of changes into one report per 5 ms


class ReportStream:
    """One dispatcher: keeps a Report stream open, reconnecting with backoff."""

    def __init__(
        self,
        address: str,
        build: Callable[[str, bool], load_report_pb2.ReportRequest],
        interval_s: float,
        on_message: Callable[[load_report_pb2.ReportResponse], None],
    ) -> None:
        self.address, self.build, self.interval_s, self.on_message = address, build, interval_s, on_message
        self.changed = asyncio.Event()
        self.reports_sent = 0
        self.connected = asyncio.Event()
        self.fresh = True  # the next report starts the stream's prefix-cache events with a snapshot
        self._task = asyncio.create_task(self._run(), name=f"report:{address}")

    async def _run(self) -> None:
        backoff = Backoff()
        while True:
            channel = open_channel(self.address)
            try:
                await self._stream(channel, backoff)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.connected.clear()
                delay = backoff.next()
                if isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    # the dispatcher refuses this worker (another model, not in its --workers): say why
                    log.error("dispatcher %s refuses this worker: %s", self.address, exc.details())
                log.info(
                    "load reports to %s interrupted (%s); reconnect in %.1fs",
                    self.address,
                    exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else exc,
                    delay,
                )
                await asyncio.sleep(delay)
            finally:
                await channel.close()

    async def _stream(self, channel: grpc.aio.Channel, backoff: Backoff) -> None:
        call = load_report_pb2_grpc.LoadReportStub(channel).Report()
        hello = await call.read()
        if hello is grpc.aio.EOF:
            raise ConnectionError("dispatcher closed the report stream")
        dispatcher_id = hello.dispatcher_id
        interval = hello.report_interval_ms / 1000 if hello.report_interval_ms else self.interval_s
        self.connected.set()
        self.fresh = True
        backoff.reset()
        reader = asyncio.create_task(self._read(call))
        try:
            while True:
                self.changed.clear()
                fresh, self.fresh = self.fresh, False
                await call.write(self.build(dispatcher_id, fresh))
                self.reports_sent += 1
                await asyncio.sleep(MIN_GAP_S)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), timeout=interval)
                if reader.done():
                    reader.result()
                    raise ConnectionError("dispatcher ended the report stream")
        finally:
            reader.cancel()
            call.cancel()

    async def _read(self, call) -> None:
        while (message := await call.read()) is not grpc.aio.EOF:
            if message.want_kv_snapshot:
                self.fresh = True
                self.changed.set()
            self.on_message(message)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class LoadReporter:
    def __init__(
        self,
        worker: common_pb2.WorkerInfo,
        incarnation: str,
        load: Callable[[], common_pb2.WorkerLoad],
        acked: Callable[[str], int],
        interval_s: float,
        group_state: Callable[[], common_pb2.DPGroupState] | None = None,
        on_start_wave: Callable[[load_report_pb2.StartWave], None] | None = None,
        kv_events: KVEventLog | None = None,
    ) -> None:
        self.worker, self.incarnation, self.load, self.acked, self.interval_s = (
            worker,
            incarnation,
            load,
            acked,
            interval_s,
        )
        self.group_state, self.on_start_wave = group_state, on_start_wave
        self.kv_events = kv_events
        self._kv_cursor: dict[str, int] = {}  # dispatcher id -> last event sequence sent to it
        self.streams: dict[str, ReportStream] = {}
        self._watch: PrefixWatch | None = None
        self._by_key: dict[str, str] = {}

    def build(self, dispatcher_id: str, fresh: bool = False) -> load_report_pb2.ReportRequest:
        events = None
        if self.kv_events is not None:
            events = self.kv_events.since(None if fresh else self._kv_cursor.get(dispatcher_id))
            self._kv_cursor[dispatcher_id] = events.last_seq
            if len(self._kv_cursor) > 1024:  # bounded: forget the oldest dispatcher
                self._kv_cursor.pop(next(iter(self._kv_cursor)))
        return load_report_pb2.ReportRequest(
            worker=self.worker,
            incarnation=self.incarnation,
            load=self.load(),
            acked_dispatch_seq=self.acked(dispatcher_id),
            timestamp_ms=int(time.time() * 1000),
            dp_group=self.group_state() if self.group_state else None,
            kv_events=events,
        )

    def on_message(self, message: load_report_pb2.ReportResponse) -> None:
        if message.HasField("start_wave") and self.on_start_wave:
            self.on_start_wave(message.start_wave)

    def changed(self) -> None:
        for stream in self.streams.values():
            stream.changed.set()

    def add(self, address: str) -> None:
        if address and address not in self.streams:
            self.streams[address] = ReportStream(address, self.build, self.interval_s, self.on_message)

    async def remove(self, address: str) -> None:
        stream = self.streams.pop(address, None)
        if stream is not None:
            await stream.close()

    def watch(self, etcd: str, prefix: str, role: str) -> PrefixWatch:
        self._watch = PrefixWatch(etcd, dispatchers_prefix(prefix, role), self._on_change)
        self._watch.start()
        return self._watch

    def _on_change(self, change: Change) -> None:
        if change.value is not None:
            address = str(change.value.get("address", ""))
            self._by_key[change.key] = address
            self.add(address)
        else:
            address = self._by_key.pop(change.key, "")
            if address and address not in self._by_key.values():
                asyncio.get_running_loop().create_task(self.remove(address))

    async def close(self) -> None:
        if self._watch:
            await self._watch.close()
        for address in list(self.streams):
            await self.remove(address)
