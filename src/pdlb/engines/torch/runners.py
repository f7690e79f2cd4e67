"""Model runners behind one interface: the torch model, or a cost model for large simulations."""

from __future__ import annotations

import hashlib
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from pdlb.common.tokenizer import EOS_TOKEN_ID
from pdlb.engines.request import Sampled, SamplingConfig
from pdlb.engines.torch import compiled_ops as compiled_ops_module
from pdlb.engines.torch import cxx_build, decode_ops_cpu, paged_attention_cpu
from pdlb.engines.torch.decode_graphs import DecodeGraphs
from pdlb.engines.torch.llama import LlamaModel
from pdlb.engines.torch.model import KVPool, ModelConfig, SeqChunk, TinyTransformer
from pdlb.engines.torch.packed_linear import pack_linears
from pdlb.engines.torch.sampler import sample_row


@dataclass
class StepItem:
    """One sequence in a step: its chunk, and how to sample its next token (if it needs one).
    `config` (None: plain temperature sampling) and `banned` take the sampler's full path; the
    runner leaves the draw's log-probabilities in `sampled` when the config asks for them."""

    chunk: SeqChunk
    sample: bool
    temperature: float = 0.0
    generator: torch.Generator | None = None
    config: SamplingConfig | None = None
    prompt: list[int] = field(default_factory=list)  # for the repetition penalty
    output: list[int] = field(default_factory=list)  # for the penalties
    banned: frozenset[int] = frozenset()  # stop tokens while min_tokens is not reached
    sampled: Sampled | None = None


class Runner(ABC):
    """Executes one batched step; owns the KV memory."""

    config: ModelConfig
    eos_token_id: int = EOS_TOKEN_ID

    @abstractmethod
    def allocate(self, n: int) -> list[int]: ...

    @abstractmethod
    def release(self, slots: list[int]) -> None: ...

    @property
    @abstractmethod
    def kv_used(self) -> int: ...

    @property
    @abstractmethod
    def kv_free(self) -> int: ...

    @abstractmethod
    def step(self, items: list[StepItem]) -> list[int | None]:
        """Run the forward pass; returns the next token of each item with sample=True, else None."""

    @abstractmethod
    def read_kv(self, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the slots, each [num_layers, len(slots), num_heads, head_dim] on the CPU."""

    @abstractmethod
    def write_kv(self, slots: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Store K and V (as read_kv returns them) at the slots."""


class TorchRunner(Runner):
    def __init__(
        self,
        model: TinyTransformer | LlamaModel,
        max_total_tokens: int,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        eos_token_id: int = EOS_TOKEN_ID,
        decode_graphs: bool | None = None,
        graph_max_batch: int = 256,
        pack_weights: bool = True,
        compiled_ops: bool = False,
        paged_attention: paged_attention_cpu.PagedDecodeAttention | bool = False,
        decode_ops: decode_ops_cpu.DecodeOps | bool = False,
        prefill_ops: decode_ops_cpu.DecodeOps | bool = False,
    ) -> None:
        """`decode_graphs`: replay decode steps from CUDA graphs (None: on CUDA devices, for models
        that support it); True on a CPU runs the same fixed-shape decode plans without capture.
        `pack_weights`: on a CPU, reorder the linear layers' weights once for oneDNN's GEMM
        (packed_linear.py; where this torch build and CPU support the dtype).
        `compiled_ops`: on a CPU, a Llama model's element-wise ops compiled in fused groups for its
        prefill steps (compiled_ops.py), compiled here, before the first step; raises RuntimeError
        if no C++ compiler is found.
        `paged_attention`: on a CPU, a Llama model's decode rows attend through pdlb's C++ kernel that
        reads the pool in place (paged_attention_cpu.py; True, or the kernel already loaded), built
        here (or loaded from its cache); raises paged_attention_cpu.Unavailable naming why it cannot run.
        `decode_ops`: on a CPU, a float32 Llama model's decode steps run their element-wise ops in
        pdlb's fused C++ kernels (decode_ops_cpu.py; True, or the ops already loaded); raises
        decode_ops_cpu.Unavailable naming why they cannot run.
        `prefill_ops`: the same kernels for its float32 prefill and mixed steps (any step with a
        prompt chunk); the same forms and errors as `decode_ops`."""
        self.device = torch.device(device)
        self.model = model.to(self.device, dtype=dtype).eval()
        self.packed_linears = pack_linears(self.model) if pack_weights and self.device.type == "cpu" else 0
        self.config = model.config
        self.eos_token_id = eos_token_id
        self.pool = KVPool(model.kv_shape(), max_total_tokens, self.device, dtype)
        on_cuda = self.device.type == "cuda"
        self.compiled_ops = compiled_ops and self.device.type == "cpu" and isinstance(model, LlamaModel)
        if self.compiled_ops and (problem := cxx_build.compiler_problem()) is not None:
            raise RuntimeError(f"compiled ops need a C++ compiler for torch.compile: {problem}")
        if self.compiled_ops:
            c = model.config
            ops = compiled_ops_module.shared()
            ops.warm_up(c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size, dtype)
            self.model.compiled_ops = ops
        self.paged_attention = bool(paged_attention) and self.device.type == "cpu" and isinstance(model, LlamaModel)
        if self.paged_attention:
            kernel = paged_attention
            if not isinstance(kernel, paged_attention_cpu.PagedDecodeAttention):  # True: load and check it here
                c = model.config
                kernel, _ = paged_attention_cpu.for_model("paged", c.num_heads, c.num_kv_heads, c.head_dim)
            self.model.decode_attention = kernel
        fusable = self.device.type == "cpu" and isinstance(model, LlamaModel)
        self.decode_ops = bool(decode_ops) and fusable
        if self.decode_ops:
            self.model.decode_ops = _loaded(decode_ops)
        self.prefill_ops = bool(prefill_ops) and fusable
        if self.prefill_ops:
            self.model.prefill_ops = _loaded(prefill_ops)
        self.graphs: DecodeGraphs | None = None
        if hasattr(model, "run_plan") and (decode_graphs or (decode_graphs is None and on_cuda)):
            self.graphs = DecodeGraphs(model, self.pool, graph_max_batch, model.config.max_position, capture=on_cuda)

    def allocate(self, n: int) -> list[int]:
        return self.pool.allocate(n)

    def release(self, slots: list[int]) -> None:
        self.pool.release(slots)

    @property
    def kv_used(self) -> int:
        return self.pool.used

    @property
    def kv_free(self) -> int:
        return self.pool.free

    def step(self, items: list[StepItem]) -> list[int | None]:
        chunks = [item.chunk for item in items]
        bucket = self.graphs.bucket(chunks) if self.graphs else None
        logits = self.graphs.run(chunks, bucket) if bucket else self.model(chunks, self.pool)
        greedy = logits.argmax(dim=-1).tolist()
        out: list[int | None] = []
        for index, item in enumerate(items):
            if not item.sample:
                out.append(None)
            elif item.config is not None or item.banned:
                config = item.config or SamplingConfig(temperature=item.temperature)
                item.sampled = sample_row(logits[index], config, item.generator, item.prompt, item.output, item.banned)
                out.append(item.sampled.token)
            elif item.temperature > 0:
                probs = torch.softmax(logits[index].cpu() / item.temperature, dim=-1)
                out.append(int(torch.multinomial(probs, 1, generator=item.generator)))
            else:
                out.append(int(greedy[index]))
        return out

    def read_kv(self, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.tensor(slots, dtype=torch.long, device=self.device)
        return self.pool.k[:, index].cpu().contiguous(), self.pool.v[:, index].cpu().contiguous()

    def write_kv(self, slots: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        index = torch.tensor(slots, dtype=torch.long, device=self.device)
        self.pool.k[:, index] = k.to(self.device, self.pool.k.dtype)
        self.pool.v[:, index] = v.to(self.device, self.pool.v.dtype)


@dataclass(frozen=True)
class CostModel:
    """Step time = base + per prefill token + per decode sequence + per attended KV token (seconds)."""

    base_s: float = 0.004
    per_prefill_token_s: float = 0.00002
    per_decode_seq_s: float = 0.0001
    per_kv_token_s: float = 0.0000002

    def scaled(self, factor: float) -> CostModel:
        if factor <= 0:
            raise ValueError("slowdown factor must be > 0")
        fields = ("base_s", "per_prefill_token_s", "per_decode_seq_s", "per_kv_token_s")
        return CostModel(*(getattr(self, f) * factor for f in fields))

    def step_time(self, items: list[StepItem]) -> float:
        prefill = sum(len(i.chunk.new_tokens) for i in items if len(i.chunk.new_tokens) > 1)
        decode = sum(1 for i in items if len(i.chunk.new_tokens) == 1)
        attended = sum(i.chunk.start_pos + len(i.chunk.new_tokens) for i in items)
        return (
            self.base_s
            + prefill * self.per_prefill_token_s
            + decode * self.per_decode_seq_s
            + attended * self.per_kv_token_s
        )


class SimRunner(Runner):
    """No tensors: each step takes the cost model's time; tokens are a hash of the context."""

    def __init__(self, config: ModelConfig, max_total_tokens: int, cost: CostModel | None = None) -> None:
        self.config = config
        self.cost = cost or CostModel()
        self.capacity = max_total_tokens
        self._free = list(range(max_total_tokens, 0, -1))
        self._slot_token: dict[int, int] = {}

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"KV budget has {len(self._free)} free tokens, {n} asked")
        taken = self._free[len(self._free) - n :][::-1]
        del self._free[len(self._free) - n :]
        return taken

    def release(self, slots: list[int]) -> None:
        self._free.extend(slots)

    @property
    def kv_used(self) -> int:
        return self.capacity - len(self._free)

    @property
    def kv_free(self) -> int:
        return len(self._free)

    def step(self, items: list[StepItem]) -> list[int | None]:
        time.sleep(self.cost.step_time(items))  # the simulated GPU time of this batch
        return self.compute(items)

    def compute(self, items: list[StepItem]) -> list[int | None]:
        """The step's tokens without its simulated time (a lockstep group waits for its slowest rank)."""
        out: list[int | None] = []
        for item in items:
            chunk = item.chunk
            end = chunk.start_pos + len(chunk.new_tokens)
            for slot, token in zip(chunk.slots[chunk.start_pos : end], chunk.new_tokens, strict=True):
                self._slot_token[slot] = token
            if not item.sample:
                out.append(None)
                continue
            context = bytes(str([self._slot_token.get(s, 0) for s in chunk.slots[max(0, end - 8) : end]]), "ascii")
            token = hashlib.blake2b(context, digest_size=2).digest()[0]  # a byte token, never EOS
            if item.config is not None and item.config.logprobs is not None:
                # The sim's next token is certain given its context: probability 1, the only likely one.
                item.sampled = Sampled(token, 0.0, [(token, 0.0)][: item.config.logprobs])
            out.append(token)
        return out

    def read_kv(self, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (self.config.num_layers, len(slots), 1, 1)
        tokens = torch.tensor([float(self._slot_token.get(s, 0)) for s in slots]).view(1, -1, 1, 1)
        return tokens.expand(shape).contiguous(), torch.zeros(shape)

    def write_kv(self, slots: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        for slot, value in zip(slots, k[0, :, 0, 0].tolist(), strict=True):
            self._slot_token[slot] = int(value)


def _loaded(ops: decode_ops_cpu.DecodeOps | bool) -> decode_ops_cpu.DecodeOps:
    """The fused element-wise ops a runner was given: those already loaded, or (True) the process's
    shared ones, built here if need be (raises decode_ops_cpu.Unavailable naming why not)."""
    return ops if isinstance(ops, decode_ops_cpu.DecodeOps) else decode_ops_cpu.shared()
