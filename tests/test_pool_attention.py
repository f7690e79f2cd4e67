"""Attention over the KV pool (pool_attention.py) against a plain reference: each sequence alone,
its K/V repeated per query head, explicit causal softmax, in float64; pdlb's paged decode kernel
(paged_attention_cpu.py) against SDPA over the gathered K/V, and through `attend`."""

from __future__ import annotations

import ctypes
import math
import os
import tempfile
import threading

import pytest
import torch
from torch.nn import functional as F

from pdlb.engines.torch import cxx_build, paged_attention_cpu
from pdlb.engines.torch.model import BatchPlan, DecodePlan, SeqChunk
from pdlb.engines.torch.pool_attention import attend

HEADS, KV_HEADS, HEAD_DIM, SLOTS = 6, 2, 8, 200


def reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int) -> torch.Tensor:
    """q [n, H, hd] at positions start..start+n-1 over keys/values [start+n, Hkv, hd] -> [n, H * hd]."""
    group = HEADS // KV_HEADS
    keys, values = keys.repeat_interleave(group, 1).double(), values.repeat_interleave(group, 1).double()
    scores = torch.einsum("qhd,khd->hqk", q.double(), keys) / math.sqrt(HEAD_DIM)
    query_pos = torch.arange(start, start + q.shape[0]).view(-1, 1)
    scores = scores.masked_fill(torch.arange(keys.shape[0]).view(1, -1) > query_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), values).reshape(q.shape[0], -1)


def assert_rows_match_reference(got, q, chunks, k_pool, v_pool) -> None:
    """Each chunk's rows of `got` (in plan order) equal `reference` over its context's K/V."""
    offset = 0
    for chunk in chunks:
        n = len(chunk.new_tokens)
        context = torch.tensor(chunk.slots[: chunk.start_pos + n])
        want = reference(q[offset : offset + n], k_pool[context], v_pool[context], chunk.start_pos)
        assert torch.allclose(got[offset : offset + n].double(), want, atol=1e-5), chunk.start_pos
        offset += n


def test_a_mixed_step_attends_like_each_sequence_alone():
    """A step with a prompt from position 0, a chunk continuing a cached context, and two decode
    tokens of different context lengths: every row as its sequence alone would attend."""
    torch.manual_seed(0)
    k_pool, v_pool = torch.randn(SLOTS + 1, KV_HEADS, HEAD_DIM), torch.randn(SLOTS + 1, KV_HEADS, HEAD_DIM)
    # slots out of order on purpose: the pool is read through each sequence's slot list
    perm = (torch.randperm(SLOTS) + 1).tolist()
    chunks = [
        SeqChunk([1] * 5, 0, perm[0:5]),  # a whole prompt
        SeqChunk([1], 30, perm[5:36]),  # decode, context 31
        SeqChunk([1] * 4, 9, perm[36:49]),  # a continued chunk: 9 cached + 4 new
        SeqChunk([1], 3, perm[49:53]),  # decode, context 4
    ]
    plan = BatchPlan(chunks, torch.device("cpu"))
    tokens = plan.tokens.shape[0]
    q = torch.randn(tokens, HEADS, HEAD_DIM)
    k_new, v_new = k_pool[plan.write_slots], v_pool[plan.write_slots]  # written before attention
    got = attend(plan.attention_layout(), q, k_new, v_new, k_pool, v_pool)
    assert got.shape == (tokens, HEADS * HEAD_DIM)
    assert_rows_match_reference(got, q, chunks, k_pool, v_pool)


def test_a_fixed_shape_decode_plan_reads_only_each_rows_context():
    """DecodePlan (padded rows, a slot table longer than every context): the padding slots and the
    pool's other slots do not change any row's result."""
    torch.manual_seed(1)
    k_pool, v_pool = torch.randn(SLOTS + 1, KV_HEADS, HEAD_DIM), torch.randn(SLOTS + 1, KV_HEADS, HEAD_DIM)
    chunks = [SeqChunk([1], 6, list(range(10, 17))), SeqChunk([1], 2, list(range(50, 53)))]
    plan = DecodePlan(batch=4, context=16, device=torch.device("cpu"))
    plan.fill(chunks)
    plan.refresh_mask()
    q = torch.randn(4, HEADS, HEAD_DIM)
    got = attend(plan.attention_layout(), q, k_pool[:4], v_pool[:4], k_pool, v_pool)
    for row, chunk in enumerate(chunks):
        context = torch.tensor(chunk.slots)
        want = reference(q[row : row + 1], k_pool[context], v_pool[context], chunk.start_pos)
        assert torch.allclose(got[row : row + 1].double(), want, atol=1e-5)


# ---- pdlb's paged decode kernel (paged_attention_cpu.py) against SDPA over the gathered K/V ----

KERNEL_MISSING = paged_attention_cpu.unavailable_reason()
NEEDS_KERNEL = pytest.mark.skipif(KERNEL_MISSING is not None, reason=f"paged kernel: {KERNEL_MISSING}")


def sdpa_over_gathered(q, k_pool, v_pool, table, lens) -> torch.Tensor:
    """The independent reference: each row's K/V gathered by advanced indexing, repeated per query
    head, SDPA with a key-padding mask, in float64. -> [B, H * hd]."""
    batch, heads, head_dim = q.shape
    group = heads // k_pool.shape[1]
    keys = k_pool[table].double().repeat_interleave(group, 2).transpose(1, 2)  # [B, H, L, hd]
    values = v_pool[table].double().repeat_interleave(group, 2).transpose(1, 2)
    mask = torch.arange(table.shape[1]).view(1, 1, 1, -1) < lens.view(-1, 1, 1, 1)
    out = F.scaled_dot_product_attention(q.double().unsqueeze(2), keys, values, attn_mask=mask)
    return out.reshape(batch, heads * head_dim)


def random_case(generator, batch, heads, kv_heads, head_dim, lens, dtype=torch.float32, pad=5):
    """A pool whose unused slots hold NaN (a kernel that read one would show it), q as a strided
    view of a wider projection (as llama.py passes it), each row's slots distinct and scattered, its
    table padded past its length with NaN slots."""
    slots = sum(lens) + 40
    k_pool = torch.full((slots + 1, kv_heads, head_dim), float("nan"))
    v_pool = torch.full((slots + 1, kv_heads, head_dim), float("nan"))
    order = (torch.randperm(slots, generator=generator) + 1).tolist()
    table = torch.zeros(batch, max(lens) + pad, dtype=torch.long)
    used = []
    for b, n in enumerate(lens):
        row, order = order[:n], order[n:]
        used += row
        table[b, :n] = torch.tensor(row)
        table[b, n:] = torch.tensor(order[: table.shape[1] - n] + [0] * table.shape[1])[: table.shape[1] - n]
    used = torch.tensor(used)
    k_pool[used] = torch.randn(len(used), kv_heads, head_dim, generator=generator) * 2
    v_pool[used] = torch.randn(len(used), kv_heads, head_dim, generator=generator)
    q = torch.randn(batch, heads + 2 * kv_heads, head_dim, generator=generator)[:, :heads] * 2
    return q.to(dtype), k_pool.to(dtype), v_pool.to(dtype), table, torch.tensor(lens)


@NEEDS_KERNEL
@pytest.mark.parametrize(
    "heads, kv_heads, head_dim",
    [(9, 3, 64), (6, 2, 8), (4, 4, 32), (8, 2, 128), (7, 1, 16), (16, 1, 64), (40, 2, 24)],
    ids=["smollm2", "hd8", "mha", "llama-1b", "group7", "group16", "hd24-group20"],
)
@pytest.mark.parametrize("threads", [1, 2])
def test_the_paged_kernel_equals_sdpa_over_the_gathered_kv(heads, kv_heads, head_dim, threads):
    """Lengths of 1 token, around the kernel's 32-token blocks and longer; every GQA group shape
    its templates cover and the generic one; torch's thread count of 1 or 2."""
    kernel = paged_attention_cpu.shared()
    generator = torch.Generator().manual_seed(head_dim * heads + threads)
    lens = [1, 31, 32, 33, 64, 65, 300, 7]
    q, k_pool, v_pool, table, lens_t = random_case(generator, len(lens), heads, kv_heads, head_dim, lens)
    if kernel.supports(heads, kv_heads, head_dim) is not None:  # group 20: more than the kernel takes
        with pytest.raises(ValueError, match="query heads over"):
            kernel(q, k_pool, v_pool, table, lens_t)
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = kernel(q, k_pool, v_pool, table, lens_t)
    finally:
        torch.set_num_threads(before)
    assert got.shape == (len(lens), heads * head_dim) and got.dtype == torch.float32
    assert torch.isfinite(got).all()  # no NaN slot (unused pool slots, table padding) was read
    want = sdpa_over_gathered(q, k_pool.nan_to_num(), v_pool.nan_to_num(), table, lens_t)
    assert (got.double() - want).abs().max().item() < 1e-5


@NEEDS_KERNEL
@pytest.mark.parametrize(
    "q_dtype, kv_dtype, tolerance",
    [
        (torch.float32, torch.bfloat16, 1e-5),
        (torch.bfloat16, torch.bfloat16, 2e-2),
        (torch.float16, torch.float16, 2e-3),
    ],
)
def test_the_paged_kernel_converts_other_dtypes_on_load(q_dtype, kv_dtype, tolerance):
    """A pool (and q) in bfloat16 or float16: float32 arithmetic on the converted values, the result
    in q's dtype, rounded once."""
    kernel = paged_attention_cpu.shared()
    generator = torch.Generator().manual_seed(5)
    q, k_pool, v_pool, table, lens = random_case(generator, 4, 9, 3, 64, [3, 40, 100, 1])
    q, k_pool, v_pool = q.to(q_dtype), k_pool.to(kv_dtype), v_pool.to(kv_dtype)
    got = kernel(q, k_pool, v_pool, table, lens)
    assert got.dtype == q_dtype
    want = sdpa_over_gathered(q, k_pool.nan_to_num(), v_pool.nan_to_num(), table, lens)
    assert (got.double() - want).abs().max().item() < tolerance


@NEEDS_KERNEL
def test_steps_through_attend_with_the_paged_kernel_equal_the_sdpa_path():
    """A mixed step (prompts, a continued chunk, decode rows at scattered positions of the step) and a
    fixed-shape decode plan (its table and lengths strided views of one buffer): attend with the
    kernel gives what it gives without, and what each sequence alone gives."""
    kernel = paged_attention_cpu.shared()
    torch.manual_seed(3)
    k_pool, v_pool = torch.randn(SLOTS + 1, KV_HEADS, HEAD_DIM), torch.randn(SLOTS + 1, KV_HEADS, HEAD_DIM)
    perm = (torch.randperm(SLOTS) + 1).tolist()
    chunks = [
        SeqChunk([1], 40, perm[0:41]),
        SeqChunk([1] * 5, 0, perm[41:46]),
        SeqChunk([1], 0, perm[46:47]),  # a first token decoded alone: context 1
        SeqChunk([1] * 4, 9, perm[47:60]),
        SeqChunk([1], 70, perm[60:131]),
    ]
    plan = BatchPlan(chunks, torch.device("cpu"))
    q = torch.randn(plan.tokens.shape[0], HEADS, HEAD_DIM)
    k_new, v_new = k_pool[plan.write_slots], v_pool[plan.write_slots]
    layout = plan.attention_layout()
    got = attend(layout, q, k_new, v_new, k_pool, v_pool, kernel)
    assert (got - attend(layout, q, k_new, v_new, k_pool, v_pool)).abs().max().item() < 1e-5
    assert_rows_match_reference(got, q, chunks, k_pool, v_pool)
    decode = DecodePlan(batch=4, context=80, device=torch.device("cpu"))
    decode.fill([chunks[0], chunks[2], chunks[4]])
    decode.refresh_mask()
    q = torch.randn(4, HEADS, HEAD_DIM)
    got = attend(decode.attention_layout(), q, k_pool[:4], v_pool[:4], k_pool, v_pool, kernel)
    for row, chunk in enumerate([chunks[0], chunks[2], chunks[4]]):
        context = torch.tensor(chunk.slots)
        want = reference(q[row : row + 1], k_pool[context], v_pool[context], chunk.start_pos)
        assert torch.allclose(got[row : row + 1].double(), want, atol=1e-5)


@NEEDS_KERNEL
def test_the_paged_kernel_refuses_bad_tables_before_reading():
    """A slot outside the pool, a length of 0 or past the table: IndexError naming it (the kernel
    checks before it reads, so a caller's mistake is an error, not a crash); shapes it does not
    take: ValueError naming the shape."""
    kernel = paged_attention_cpu.shared()
    generator = torch.Generator().manual_seed(9)
    q, k_pool, v_pool, table, lens = random_case(generator, 2, 9, 3, 64, [10, 20])
    bad = table.clone()
    bad[1, 19] = k_pool.shape[0]
    with pytest.raises(IndexError, match="outside the pool"):
        kernel(q, k_pool, v_pool, bad, lens)
    bad[1, 19] = -1
    with pytest.raises(IndexError, match="outside the pool"):
        kernel(q, k_pool, v_pool, bad, lens)
    for wrong in ([10, 0], [10, table.shape[1] + 1]):
        with pytest.raises(IndexError, match="context length"):
            kernel(q, k_pool, v_pool, table, torch.tensor(wrong))
    with pytest.raises(ValueError, match="head_dim 12"):
        kernel(q[..., :12], k_pool[..., :12], v_pool[..., :12], table, lens)
    with pytest.raises(ValueError, match="int64 slot table"):
        kernel(q, k_pool, v_pool, table.int(), lens)
    assert kernel.supports(9, 3, 64) is None and "head_dim 60" in kernel.supports(9, 3, 60)


@NEEDS_KERNEL
def test_the_paged_kernel_runs_on_torchs_own_threads():
    """Built against the OpenMP runtime torch has loaded: calls start no threads of their own (a
    second runtime would start a second team competing for the cores), and 1 or 2 threads give the
    same bits (each (sequence, KV head) is computed by one thread in one order)."""
    kernel = paged_attention_cpu.shared()
    generator = torch.Generator().manual_seed(11)
    q, k_pool, v_pool, table, lens = random_case(generator, 16, 9, 3, 64, [200 + i for i in range(16)])
    results = {}

    def run(threads: int) -> None:  # on a fresh thread, as the worker's runner thread calls it
        torch.set_num_threads(threads)
        torch.ones(1 << 18).exp_()  # torch's team for this thread exists before counting
        before = set(os.listdir("/proc/self/task"))
        results[threads] = [kernel(q, k_pool, v_pool, table, lens) for _ in range(5)]
        results[f"new threads {threads}"] = set(os.listdir("/proc/self/task")) - before

    for threads in (1, 2):
        worker = threading.Thread(target=run, args=(threads,))
        worker.start()
        worker.join()
    assert results["new threads 1"] == set() and results["new threads 2"] == set()
    assert all(torch.equal(r, results[1][0]) for r in results[1] + results[2])
    maps = open("/proc/self/maps").read()
    assert len({line.split()[-1] for line in maps.splitlines() if "libgomp" in line}) == 1


def test_the_kernel_build_is_cached_by_everything_that_changes_the_binary(tmp_path):
    """cxx_build: a second build of the same source and flags is the cached file; a changed
    source, header beside it or flag builds anew; a compile error is BuildFailed with the
    compiler's words."""
    if not cxx_build.available():
        pytest.skip("no C++ compiler")
    source = tmp_path / "k.cpp"
    source.write_text('extern "C" int answer() { return 42; }\n')
    first = cxx_build.build(source, ["-O1"], tmp_path / "cache")
    assert cxx_build.build(source, ["-O1"], tmp_path / "cache") == first
    assert cxx_build.build(source, ["-O2"], tmp_path / "cache") != first
    source.write_text('extern "C" int answer() { return 43; }\n')
    second = cxx_build.build(source, ["-O1"], tmp_path / "cache")
    assert second != first and ctypes.CDLL(str(second)).answer() == 43
    # a header beside the source, which it includes, is part of what the cache is keyed by
    (tmp_path / "value.h").write_text("#define VALUE 7\n")
    source.write_text('#include "value.h"\nextern "C" int answer() { return VALUE; }\n')
    seven = cxx_build.build(source, ["-O1"], tmp_path / "cache")
    (tmp_path / "value.h").write_text("#define VALUE 8\n")
    eight = cxx_build.build(source, ["-O1"], tmp_path / "cache")
    assert eight != seven and ctypes.CDLL(str(eight)).answer() == 8
    source.write_text("this is not C++\n")
    with pytest.raises(cxx_build.BuildFailed, match=r"could not build k\.cpp"):
        cxx_build.build(source, ["-O1"], tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("k-*.so"))) <= cxx_build.KEEP


def test_a_damaged_cached_kernel_is_built_again_never_loaded(tmp_path):
    """A cached library truncated after its build (dlopen of it dies of SIGBUS, past any handler) no
    longer matches the digest in its name: the next build removes it and builds the library again."""
    if not cxx_build.available():
        pytest.skip("no C++ compiler")
    source = tmp_path / "k.cpp"
    source.write_text('extern "C" int answer() { return 42; }\n')
    built = cxx_build.build(source, ["-O1"], tmp_path / "cache")
    whole = built.read_bytes()
    built.write_bytes(whole[:1000])
    again = cxx_build.build(source, ["-O1"], tmp_path / "cache")
    assert again.read_bytes() != whole[:1000] and ctypes.CDLL(str(again)).answer() == 42
    assert [p.name for p in (tmp_path / "cache").glob("k-*.so")] == [again.name]


def test_an_unwritable_cache_builds_into_a_private_temp_dir_and_never_a_foreign_one(tmp_path, monkeypatch):
    """A cache directory that cannot be written: the library is built into <temp>/pdlb-kernels-<uid>,
    created 0700; that directory, when open to others, is never used (its files are loaded as code)."""
    if not cxx_build.available():
        pytest.skip("no C++ compiler")
    source = tmp_path / "k.cpp"
    source.write_text('extern "C" int answer() { return 7; }\n')
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache directory should be")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "temp"))
    (tmp_path / "temp").mkdir()
    built = cxx_build.build(source, ["-O1"], blocked / "cache")
    private = tmp_path / "temp" / f"pdlb-kernels-{os.getuid()}"
    assert built.parent == private and ctypes.CDLL(str(built)).answer() == 7
    assert private.stat().st_mode & 0o777 == 0o700
    private.chmod(0o777)
    source.write_text('extern "C" int answer() { return 8; }\n')
    with pytest.raises(cxx_build.BuildFailed, match="private temp directory"):
        cxx_build.build(source, ["-O1"], blocked / "cache")


def test_auto_falls_back_to_sdpa_where_the_kernel_cannot_run_and_paged_says_why(monkeypatch, tmp_path):
    """--cpu-decode-attention: auto takes the kernel where it builds and takes the model's shape,
    else none with the reason; paged raises Unavailable naming it; sdpa never loads it."""
    assert paged_attention_cpu.for_model("sdpa", 9, 3, 64)[0] is None
    if KERNEL_MISSING is None:
        kernel, _ = paged_attention_cpu.for_model("auto", 9, 3, 64)
        assert kernel is paged_attention_cpu.shared()
        kernel, why = paged_attention_cpu.for_model("auto", 9, 3, 60)
        assert kernel is None and "head_dim 60" in why
        with pytest.raises(paged_attention_cpu.Unavailable, match="head_dim 60"):
            paged_attention_cpu.for_model("paged", 9, 3, 60)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no compiler on PATH, and no kernel loaded yet
    paged_attention_cpu.shared.cache_clear()
    try:
        kernel, why = paged_attention_cpu.for_model("auto", 9, 3, 64)
        assert kernel is None and "no C++ compiler" in why
        with pytest.raises(paged_attention_cpu.Unavailable, match="no C\\+\\+ compiler"):
            paged_attention_cpu.for_model("paged", 9, 3, 64)
    finally:
        paged_attention_cpu.shared.cache_clear()  # later callers load the built kernel again
