"""Exact prefix index from worker KV events.

Property: any interleaving of cache changes, reports, lost reports (a broken stream reconnects
with a snapshot), snapshot requests and deliveries converges to the worker's true cache.
Real processes: two dispatcher replicas in front of the same workers; a prefix one replica sent
somewhere is found there by the other, which never saw it, because both read the workers' events.
"""

from __future__ import annotations

import asyncio
from collections import deque

from hypothesis import given, settings
from hypothesis import strategies as st

from pdlb.engines.kv_events import KVEventLog
from pdlb.engines.torch.prefix_cache import PrefixCache
from pdlb.services.dispatcher.kv_index import ExactPrefixIndex
from pdlb.services.dispatcher.prefix_index import PrefixIndex, nested_depths
from pdlb.v1 import common_pb2, dispatch_pb2
from tests.helpers import dispatch_stub, load_snapshot, wait_for_workers, wait_until


class Stream:
    """One worker -> dispatcher report stream, as reporter.py and the LoadReport servicer use it."""

    def __init__(self, log: KVEventLog, index: ExactPrefixIndex) -> None:
        self.log, self.index = log, index
        self.cursor: int | None = None  # None: the next report carries a snapshot
        self.wire: deque = deque()  # reports in flight, in order
        self.asked = False  # the dispatcher's want_kv_snapshot, on its way back

    def report(self) -> None:
        events = self.log.since(self.cursor)
        self.cursor = events.last_seq
        self.wire.append(events)

    def deliver(self) -> None:
        if self.wire and self.index.apply("w", self.wire.popleft()):
            self.asked = True

    def lose(self) -> None:
        """The stream broke: what was in flight is lost, and the new stream starts with a snapshot."""
        self.wire.clear()
        self.cursor = None

    def answer(self) -> None:
        if self.asked:
            self.asked, self.cursor = False, None


ops = st.lists(
    st.one_of(
        st.tuples(st.just("store"), st.integers(0, 30)),
        st.tuples(st.just("remove"), st.integers(0, 30)),
        st.tuples(st.sampled_from(["report", "deliver", "lose", "answer", "drop_one"])),
    ),
    max_size=80,
)


@settings(max_examples=500, deadline=None)
@given(ops=ops, keep=st.integers(4, 64))
def test_events_gaps_and_snapshots_converge_to_the_true_cache(ops, keep):
    log = KVEventLog(max_events=keep)  # a short log: falling behind it forces snapshots
    index = ExactPrefixIndex()
    stream = Stream(log, index)
    for op, *args in ops:
        if op == "store" and args[0] not in log.live:
            log.stored(args[0])
        elif op == "remove" and args[0] in log.live:
            log.removed(args[0])
        elif op == "drop_one" and stream.wire:
            stream.wire.popleft()  # one report lost without the stream noticing: a gap
        elif op in ("report", "deliver", "lose", "answer"):
            getattr(stream, op)()
        if index.synced("w"):
            assert index.next_seq["w"] <= log.seq + 1
    for _ in range(4):  # then the stream runs normally: report, deliver, answer snapshot requests
        stream.report()
        while stream.wire:
            stream.deliver()
        stream.answer()
    assert index.synced("w")
    assert index.blocks.get("w", set()) == log.live


def test_block_names_of_the_worker_cache_equal_the_dispatchers():
    log = KVEventLog()
    cache = PrefixCache(16, lambda slots: None, log)
    prompt = list(range(100, 164))
    cache.insert(prompt, list(range(64)), [])
    assert sorted(log.live) == sorted(PrefixIndex(16).chain(prompt))


async def test_a_replica_finds_a_prefix_the_other_replica_placed(etcd, prefix, start_service):
    common = ["--etcd", etcd.endpoint, "--etcd-prefix", prefix]
    replicas = [
        start_service("dispatcher", *common, "--load-balance-method", "cache_aware", name=f"replica-{i}")
        for i in range(2)
    ]
    for rank in range(2):
        start_service("scheduler", *common, "--runner", "sim", "--dp-rank", str(rank), name=f"sim-{rank}")
    (ch_a, a), (ch_b, b) = (dispatch_stub(r.address) for r in replicas)

    async def run(stub, rid: str, ids: list[int]) -> tuple[int, int]:
        req = common_pb2.InferenceRequest(
            request_id=rid,
            input_ids=ids,
            sampling=common_pb2.SamplingParams(max_new_tokens=2, ignore_eos=True, temperature=0.0),
        )
        chunks = [c async for c in stub.Generate(dispatch_pb2.GenerateRequest(request=req), timeout=30)]
        return chunks[-1].dp_rank, chunks[-1].cached_tokens

    try:
        await wait_for_workers(a, 2)
        await wait_for_workers(b, 2)
        same = 0
        for i in range(6):
            head = [(i * 37 + j) % 250 + 1 for j in range(96)]  # 6 blocks of 16
            rank, _ = await run(a, f"a{i}", [*head, 1])

            async def known(blocks: int = 6 * (i + 1)) -> bool:
                rows = (await load_snapshot(b)).workers
                return sum(r.kv_index_blocks for r in rows) >= blocks

            await wait_until(known, 10, "replica B to learn the blocks from the worker's events")
            other_rank, cached = await run(b, f"b{i}", [*head, 2, 3])
            same += other_rank == rank and cached >= 96
        assert same == 6, f"replica B followed the prefix in {same} of 6 cases"
    finally:
        await ch_a.close()
        await ch_b.close()
    await asyncio.sleep(0)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 12), min_size=0, max_size=6), st.integers(1, 14))
def test_nested_depths_is_each_workers_longest_held_prefix(depths, length):
    """Holder sets that nest (a worker holding block i holds every block above it), as both
    indexes keep them: one walk down the chain finds what a per-worker scan finds."""
    names = list(range(100, 100 + length))
    holders: dict[int, set[str]] = {}
    for w, depth in enumerate(depths):
        for name in names[:depth]:
            holders.setdefault(name, set()).add(f"w{w}")
    expected = {}
    for w in range(len(depths)):
        held = 0
        while held < length and f"w{w}" in holders.get(names[held], set()):
            held += 1
        if held:
            expected[f"w{w}"] = held
    assert nested_depths(holders, names) == expected
