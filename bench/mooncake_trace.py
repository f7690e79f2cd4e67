"""The Mooncake conversation trace (FAST'25, kvcache-ai/Mooncake) as a replayable workload.

Each line holds an arrival time (ms), input and output lengths and the prompt's prefix blocks
(`hash_ids`, 512 tokens each; one id is the same block content wherever it appears). Replayed on
small simulated ranks it is scaled, and every result names the scaling:
- lengths are divided by `length_divisor` (and the block size with them, 512 / divisor tokens), so
  prompts fit the ranks and prefix sharing keeps its shape;
- a window of `num_requests` requests from `start` is taken, and time is compressed by `speedup`.

Block contents are token ids drawn from a generator seeded by the block id, so two requests that
share leading ids share exactly those tokens.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from pdlb.workload import WorkItem

TRACE_BLOCK_TOKENS = 512
# The checkout's sibling folder `shared/traces/` holds the trace (see its README)
DEFAULT_TRACE = (
    Path(__file__).resolve().parent.parent / ".." / "shared" / "traces" / "mooncake_conversation_trace.jsonl"
)
VOCAB = 256  # the sim ranks' and the byte tokenizer's token ids


@dataclass(frozen=True)
class TraceScaling:
    """How the trace is replayed: stated beside every result."""

    start: int = 0
    num_requests: int = 200
    length_divisor: int = 16
    speedup: float = 1.0
    max_input: int = 8192  # longest prompt after scaling, tokens (longer ones are cut, block-aligned)
    max_output: int = 256

    def describe(self) -> str:
        return (
            f"Mooncake conversation trace, requests {self.start}..{self.start + self.num_requests - 1}, "
            f"lengths / {self.length_divisor} (blocks of {TRACE_BLOCK_TOKENS // self.length_divisor} tokens), "
            f"time / {self.speedup:g}, prompts <= {self.max_input} and outputs <= {self.max_output} tokens"
        )


def load(path: Path, scaling: TraceScaling) -> tuple[list[WorkItem], list[int]]:
    """The window of the trace as work items (arrivals from 0, seconds, in trace order), and for each
    the tokens of its prompt that an earlier request of the window already had as the same leading
    blocks: the most any prefix cache can serve it (for TTFT floors).

    Raises FileNotFoundError naming the path when the trace is missing."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the Mooncake trace is not there (see shared/traces/README.md)")
    block = TRACE_BLOCK_TOKENS // scaling.length_divisor
    rows = []
    with path.open() as lines:
        for index, line in enumerate(lines):
            if index < scaling.start:
                continue
            if len(rows) == scaling.num_requests:
                break
            rows.append(json.loads(line))
    if not rows:
        return [], []
    t0 = rows[0]["timestamp"]
    items, reusable = [], []
    blocks: dict[int, list[int]] = {}
    seen: dict[int, int] = {}  # leading block chain of an earlier request (named by a hash chain) -> its tokens
    for index, row in enumerate(rows):
        length = max(1, min(scaling.max_input, row["input_length"] // scaling.length_divisor))
        ids: list[int] = []
        for hash_id in row["hash_ids"]:
            if len(ids) >= length:
                break
            content = blocks.get(hash_id)
            if content is None:
                rng = random.Random(hash_id)
                content = blocks[hash_id] = [rng.randrange(VOCAB) for _ in range(block)]
            ids.extend(content)
        ids = ids[:length]
        names, name = [], 0
        for hash_id in row["hash_ids"]:
            name = hash((name, hash_id))
            names.append(name)
        shared = next((seen[n] for n in reversed(names) if n in seen), 0)
        for n, chain in enumerate(names, 1):  # a prompt cut short within a block covers only its part
            seen[chain] = max(seen.get(chain, 0), min(n * block, length))
        reusable.append(min(shared, max(0, length - 1)))  # the last prompt token is always computed
        output = max(1, min(scaling.max_output, row["output_length"] // scaling.length_divisor))
        arrival = (row["timestamp"] - t0) / 1000 / scaling.speedup
        items.append(WorkItem(index, arrival, ids, output, group=row["hash_ids"][0] if row["hash_ids"] else -1))
    return items, reusable
