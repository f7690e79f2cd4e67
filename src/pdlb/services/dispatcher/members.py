"""Keeps the load table's membership in step with etcd (or a static worker list)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from pdlb.common.membership import Change
from pdlb.services.dispatcher.load_table import LoadTable, ReportedLoad, Role, Worker

log = logging.getLogger(__name__)
MAX_PENDING_REPORTS = 4096


def parse_static_workers(spec: list[str], role: Role) -> list[Worker]:
    """'host:port' (rank = position) or 'rank@host:port' items into workers."""
    workers = []
    for position, item in enumerate(spec):
        rank_text, sep, address = item.rpartition("@")
        rank = int(rank_text) if sep else position
        address = address if sep else item
        if rank < 0 or ":" not in address:
            raise ValueError(f"static worker {item!r} is not [rank@]host:port")
        workers.append(Worker(worker_id=f"static-{rank}-{address}", role=role, dp_rank=rank, address=address))
    return workers


def worker_from_value(value: dict, role: Role) -> Worker | None:
    """A worker from its etcd JSON value, or None when the value is malformed or of another role."""
    try:
        worker = Worker(
            str(value["worker_id"]),
            Role(value["role"]),
            int(value["dp_rank"]),
            str(value["address"]),
            str(value.get("model", "")),
        )
    except (KeyError, ValueError, TypeError):
        return None
    if worker.role is not role or worker.dp_rank < 0 or not worker.worker_id:
        return None
    return worker


class NotAMember(Exception):
    """A load report from a worker that is not part of the configured membership."""


class Members:
    """Applies membership changes and holds reports that arrive before the worker's registration."""

    def __init__(
        self, table: LoadTable, role: Role, static: bool, on_removed: Callable[[str], None], model: str = ""
    ) -> None:
        self.table, self.role, self.static, self.on_removed = table, role, static, on_removed
        self.model = model  # workers advertising another model are refused (one model per role)
        self._pending: OrderedDict[str, tuple[Worker, ReportedLoad, int, str]] = OrderedDict()
        self._ids_by_key: dict[str, str] = {}
        self._joined = asyncio.Event()  # set (and replaced) whenever a worker joins the table
        self._rank_left_at: OrderedDict[int, float] = OrderedDict()  # rank -> when it last lost its worker

    def on_etcd_change(self, change: Change) -> None:
        if change.value is None:
            worker_id = self._ids_by_key.pop(change.key, None)
            entry = self.table.remove(worker_id) if worker_id else None
            if entry is not None:
                log.info("worker %s left (key %s)", worker_id, change.key)
                self._rank_left(entry.dp_rank)
                self.on_removed(worker_id)
            return
        worker = worker_from_value(change.value, self.role)
        if worker is None:
            log.warning("ignoring malformed or foreign membership value at %s", change.key)
            return
        if (why := self.model_mismatch(worker)) is not None:
            log.error("refusing worker %s: %s", worker.worker_id, why)
            return
        self._ids_by_key[change.key] = worker.worker_id
        self.table.upsert(worker)
        self._announce_join()
        log.info("worker %s joined: rank %d at %s", worker.worker_id, worker.dp_rank, worker.address)
        pending = self._pending.pop(worker.worker_id, None)
        if pending is not None:
            _, load, acked, incarnation = pending
            self.table.apply_report(worker.worker_id, load, acked, incarnation)

    def _rank_left(self, rank: int) -> None:
        self._rank_left_at[rank] = time.monotonic()
        self._rank_left_at.move_to_end(rank)
        while len(self._rank_left_at) > MAX_PENDING_REPORTS:
            self._rank_left_at.popitem(last=False)

    def left_lately(self, rank: int, within_s: float) -> bool:
        """Whether the DP rank lost a worker within the last `within_s` seconds."""
        left_at = self._rank_left_at.get(rank)
        return left_at is not None and time.monotonic() - left_at <= within_s

    def _announce_join(self) -> None:
        self._joined.set()
        self._joined = asyncio.Event()

    async def wait_join(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the next worker to join the table; True if one did."""
        joined = self._joined
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(joined.wait(), max(timeout, 0.0))
        return joined.is_set()

    def model_mismatch(self, worker: Worker) -> str | None:
        """Why the worker may not join (it serves another model), or None."""
        if not self.model or not worker.model or worker.model == self.model:
            return None
        return (
            f"worker {worker.worker_id} (rank {worker.dp_rank}) serves model {worker.model!r}, but this "
            f"{self.role.value} dispatcher routes model {self.model!r}: start it with the same --model, "
            "or give it its own dispatcher"
        )

    def add_static(self, workers: list[Worker]) -> None:
        for worker in workers:
            self.table.upsert(worker)
        self._announce_join()

    def on_report(self, worker: Worker, load: ReportedLoad, acked: int, incarnation: str) -> bool | None:
        """Apply a report. Returns None when the worker is unknown (report held until it registers).
        Raises NotAMember for a static-mode report from an address outside `--workers`, or from a
        worker of another model."""
        if (why := self.model_mismatch(worker)) is not None:
            if self.static:  # its --workers entry would otherwise still get (wrongly tokenised) requests
                for entry in [e for e in self.table.entries.values() if e.worker.address == worker.address]:
                    self.table.remove(entry.worker.worker_id)
                    self.on_removed(entry.worker.worker_id)
            raise NotAMember(why)
        if worker.worker_id not in self.table.entries:
            if not self.static:
                self._hold(worker, load, acked, incarnation)
                return None
            self._adopt(worker)
        return self.table.apply_report(worker.worker_id, load, acked, incarnation)

    def _adopt(self, worker: Worker) -> None:
        """Static mode: a reporting worker takes over the static entry of its address and rank. A
        report can never add a worker: anyone able to reach the port could then attract traffic."""
        listed = [e for e in self.table.entries.values() if e.worker.address == worker.address]
        if not any(e.worker.dp_rank == worker.dp_rank for e in listed):
            raise NotAMember(
                f"worker {worker.worker_id} (rank {worker.dp_rank} at {worker.address}) is not in this "
                "dispatcher's --workers list; list it there or use etcd membership"
            )
        self.table.upsert(worker)  # first, so the address never looks unused (its channel stays open)
        self._announce_join()
        for entry in listed:
            if entry.worker.worker_id != worker.worker_id:
                self.table.remove(entry.worker.worker_id)
                self.on_removed(entry.worker.worker_id)

    def _hold(self, worker: Worker, load: ReportedLoad, acked: int, incarnation: str) -> None:
        self._pending[worker.worker_id] = (worker, load, acked, incarnation)
        self._pending.move_to_end(worker.worker_id)
        while len(self._pending) > MAX_PENDING_REPORTS:
            self._pending.popitem(last=False)
