"""`pdlb up`'s supervision: a child (or etcd) that dies while the cluster runs is restarted on the
same ports, after an exponential backoff, and each death and restart is reported on the console.

A child that dies again within `STABLE_S` of its restart counts towards `max_restarts` in a row;
after that many the supervisor gives up on it (said on the console, the rest keeps running). Restarts
are spawned from the main thread: a child's parent-death signal follows the thread that spawned it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pdlb.common.plurals import counted
from pdlb.common.processes import ServiceFailed, ServiceProcess

if TYPE_CHECKING:
    from pdlb.cli.local_cluster import LocalCluster

FIRST_DELAY_S = 0.5
MAX_DELAY_S = 30.0
STABLE_S = 60.0  # up this long after a restart: its next death starts the backoff afresh
RESTART_TIMEOUT_S = 300.0
ETCD = "etcd"


@dataclass
class Record:
    in_a_row: int = 0
    started: float = 0.0
    due: float | None = None  # when the scheduled restart runs (monotonic)
    gave_up: bool = False


class Supervisor:
    def __init__(self, cluster: LocalCluster, say: Callable[[str], None], max_restarts: int) -> None:
        self.cluster, self.say, self.max_restarts = cluster, say, max_restarts
        self.records: dict[str, Record] = {}
        self.restarts = 0  # done so far, all children together

    def run(self, stop: threading.Event) -> None:
        """Until `stop` is set: wait for a child to exit (the cluster's `wake` event), schedule its
        restart, and run restarts when due."""
        wake = self.cluster.wake
        while not stop.is_set():
            wake.clear()  # before scanning: an exit after the scan wakes the wait below
            now = time.monotonic()
            for name, dead in self._dead():
                record = self.records.setdefault(name, Record(started=now))
                if record.due is not None or record.gave_up:
                    continue
                if name != "etcd":  # its registration would outlive it by a lease: drop it now
                    self.cluster.forget(self._service(name).address)
                if now - record.started >= STABLE_S:
                    record.in_a_row = 0
                if record.in_a_row >= self.max_restarts:
                    record.gave_up = True
                    self.say(f"! {dead}; gave up after {counted(record.in_a_row, 'restart')} in a row (--max-restarts)")
                    continue
                delay = min(FIRST_DELAY_S * 2**record.in_a_row, MAX_DELAY_S)
                record.due = now + delay
                # a lockstep DP group restarts as a whole: its ranks only become ready together
                group = [other for other in self.cluster.group_of(name) if other != name]
                for other in group:
                    self._stop(other)
                    self.records.setdefault(other, Record(started=now)).due = record.due
                with_group = f" with its DP group ({', '.join(group)})" if group else ""
                which = f"restart {record.in_a_row + 1} in a row"
                self.say(f"! {dead}; restarting it{with_group} in {delay:.1f}s ({which})")
            ran = [n for n, r in self.records.items() if r.due is not None and r.due <= time.monotonic()]
            if ran and not stop.is_set():
                self._restart(ran)
            if ran:
                continue  # scan again at once: a restart may have failed
            due = [r.due for r in self.records.values() if r.due is not None]
            wake.wait(max(min(due) - time.monotonic(), 0) if due else None)

    def _dead(self) -> list[tuple[str, str]]:
        """(name, what happened) of every child that is not running."""
        found = []
        etcd = self.cluster.etcd
        if etcd is not None and etcd.proc is not None and etcd.proc.poll() is not None:
            found.append((ETCD, f"etcd exited with status {etcd.proc.returncode}; see {etcd.log_path}"))
        for proc in self.cluster.services:
            if proc.proc is not None and not proc.alive():
                found.append((proc.name, str(proc.failure())))
        return found

    def _restart(self, names: list[str]) -> None:
        """Restart every child that is due: etcd first, then the services all spawned before any is
        waited for (the ranks of a lockstep group only become ready together)."""
        for name in names:
            record = self.records[name]
            record.due = None
            record.in_a_row += 1
            record.started = time.monotonic()
            self.restarts += 1
        if ETCD in names:
            try:
                self.cluster.restart_etcd()
                self._back(ETCD, self.cluster.etcd.endpoint if self.cluster.etcd else "")
            except (RuntimeError, TimeoutError, OSError) as exc:
                self.say(f"! restart of etcd failed: {exc}")
        spawned = []
        for name in names:
            if name != ETCD:
                proc = self._service(name)
                try:
                    proc.spawn()
                except OSError as exc:
                    self.say(f"! restart of {name} failed: {exc}")
                    continue
                spawned.append(proc)
        for proc in spawned:
            try:
                self._back(proc.name, proc.wait_ready(RESTART_TIMEOUT_S).address)
            except (ServiceFailed, RuntimeError, TimeoutError, OSError) as exc:
                # still dead: the next scan schedules the next try, further backed off
                self.say(f"! restart of {proc.name} failed: {exc}")
        self.cluster.save()

    def _back(self, name: str, address: str) -> None:
        self.say(f"  {name} is back on {address} (restart {self.records[name].in_a_row} in a row)")

    def _stop(self, name: str) -> None:
        proc = self._service(name)
        if proc.alive():
            proc.terminate(timeout=10)

    def _service(self, name: str) -> ServiceProcess:
        return next(p for p in self.cluster.services if p.name == name)
