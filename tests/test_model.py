"""The real model against an independent implementation: Hugging Face `transformers` (test-only).

Logits and greedy tokens of pdlb's Llama runner are compared with transformers for a random Llama
(and Qwen2) written as a Hugging Face directory by the test, and for the packaged SmolLM2 GGUF,
through the engine with chunked prefill, batching and prefix-cache hits. The tokenizer built from
GGUF metadata is compared with transformers' own GGUF tokenizer.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

from pdlb.common.tokenizer import ByteTokenizer, StreamDecoder
from pdlb.engines.request import EngineLimits, Sequence
from pdlb.engines.torch import compiled_ops, cxx_build, decode_ops_cpu, paged_attention_cpu
from pdlb.engines.torch.batching import Engine
from pdlb.engines.torch.decode_graphs import DecodeGraphs
from pdlb.engines.torch.llama import LlamaModel
from pdlb.engines.torch.model import SeqChunk
from pdlb.engines.torch.runners import TorchRunner
from pdlb.models.catalog import SMOLLM2, resolve
from pdlb.models.config import UnsupportedModel

transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore", module="transformers")

# float32 on both sides: differences are summation order only
LOGIT_TOLERANCE = 2e-3
TEXTS = [
    "Hello world!",
    "The year 2024 had 366 days; 12345 + 67890 = 80235.",
    "naïve café, Ünïcödé — \u2018quotes\u2019 and \u201cmore\u201d",
    "日本語のテキストと中文混合",
    "emoji: 🎉🚀👩‍👩‍👧‍👦 done",
    "def f(x):\n    return x  # code\n\n\ttabs\r\n",
    "  leading and trailing spaces   ",
    "<|im_start|>user\nspecial tokens inside text<|im_end|>",
]


@pytest.fixture(scope="module")
def smollm2():
    source = resolve(SMOLLM2)
    return source, source.tokenizer()


@pytest.fixture(scope="module")
def smollm2_reference(smollm2):
    source, _ = smollm2
    directory, name = str(source.path.parent), source.path.name
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    return model, tokenizer


@pytest.fixture(scope="module")
def smollm2_runner(smollm2):
    source, tokenizer = smollm2
    torch.set_num_threads(2)
    model = LlamaModel(source.config())
    model.load_weights(source.state_dict())
    return TorchRunner(model, 4096, eos_token_id=tokenizer.eos_token_id)


def test_gguf_tokenizer_matches_transformers(smollm2, smollm2_reference):
    _, ours = smollm2
    _, reference = smollm2_reference
    assert ours.vocab_size == len(reference) and ours.eos_token_id == reference.eos_token_id == 2
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True)
        if "<|" not in text:
            assert ours.decode(ids) == text  # byte-level BPE round-trips any text
    messages = [("system", "Be brief."), ("user", "What is 2+2?"), ("assistant", "4"), ("user", "And 3+3?")]
    chat = [{"role": r, "content": c} for r, c in messages]
    expected = reference.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert ours.apply_chat_template(messages) == expected
    assert ours.encode_chat(messages) == reference.encode(expected, add_special_tokens=False)


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_the_whole_decode(smollm2, text):
    _, tokenizer = smollm2
    ids = tokenizer.encode(text)
    for step in (1, 2, 3):
        decoder = StreamDecoder(tokenizer)
        pieces = [decoder.push(ids[i : i + step]) for i in range(0, len(ids), step)]
        pieces.append(decoder.flush())
        assert "".join(pieces) == tokenizer.decode(ids)
        assert not any("\ufffd" in piece for piece in pieces), pieces  # no half characters released


def test_stream_decoder_holds_back_split_utf8_of_the_byte_tokenizer():
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode("a🎉b")
    decoder = StreamDecoder(tokenizer)
    pieces = [decoder.push([t]) for t in ids]
    assert pieces == ["a", "", "", "", "🎉", "b"]


def test_stream_decoder_memory_stays_bounded(smollm2):
    _, tokenizer = smollm2
    decoder = StreamDecoder(tokenizer)
    ids = tokenizer.encode("word " * 2000)
    text = "".join(decoder.push([t]) for t in ids) + decoder.flush()
    assert text == tokenizer.decode(ids) and len(decoder.ids) < 200


NEEDS_COMPILER = pytest.mark.skipif(not cxx_build.available(), reason="torch.compile needs a C++ compiler")
NEEDS_PAGED_KERNEL = pytest.mark.skipif(
    paged_attention_cpu.unavailable_reason() is not None,
    reason=f"paged decode attention kernel: {paged_attention_cpu.unavailable_reason()}",
)
NEEDS_FUSED_OPS = pytest.mark.skipif(
    decode_ops_cpu.unavailable_reason() is not None,
    reason=f"fused decode ops: {decode_ops_cpu.unavailable_reason()}",
)


def _compile_into(runner: TorchRunner, ops: bool, paged: bool = False, fused: bool = False) -> None:
    """Give a CPU runner's model the compiled element-wise ops (as its compiled_ops flag would),
    compiled now, for steps of any size; `paged`: the paged decode attention kernel (as
    --cpu-decode-attention paged would); `fused`: the fused element-wise ops in decode and prefill
    steps (as --cpu-decode-ops fused with --cpu-prefill-ops auto would)."""
    if ops:
        c = runner.config
        compiled = compiled_ops.shared()
        compiled.warm_up(c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size, torch.float32)
        runner.model.compiled_ops = compiled
        runner.model.compiled_ops_min_tokens = 1  # the test's short steps take the compiled ops too
    if paged:
        runner.model.decode_attention = paged_attention_cpu.shared()
    if fused:
        runner.model.decode_ops = runner.model.prefill_ops = decode_ops_cpu.shared()


def _back_to_defaults(runner: TorchRunner) -> None:
    runner.model.compiled_ops = None
    runner.model.decode_attention = None
    runner.model.decode_ops = runner.model.prefill_ops = None
    runner.model.__dict__.pop("compiled_ops_min_tokens", None)  # back to the class default


@pytest.mark.parametrize(
    "ops", ["eager", pytest.param("compiled", marks=NEEDS_COMPILER), pytest.param("fused", marks=NEEDS_FUSED_OPS)]
)
def test_smollm2_logits_match_transformers(smollm2, smollm2_reference, smollm2_runner, ops):
    """Prefill logits within the tolerance of transformers', eager, with the compiled element-wise
    ops (compiled_ops.py) and with pdlb's fused C++ ones (decode_ops_cpu.py)."""
    _, tokenizer = smollm2
    reference, _ = smollm2_reference
    _compile_into(smollm2_runner, ops == "compiled", fused=ops == "fused")
    try:
        for text in TEXTS[:3]:
            ids = tokenizer.encode(text)
            ours = _prefill_logits(smollm2_runner, ids)
            with torch.no_grad():
                theirs = reference(torch.tensor([ids])).logits[0, -1]
            assert (ours - theirs).abs().max().item() < LOGIT_TOLERANCE, text
            assert int(ours.argmax()) == int(theirs.argmax())
    finally:
        _back_to_defaults(smollm2_runner)


@pytest.mark.parametrize("flags", [["--cpu-compiled-ops"], ["--cpu-decode-attention", "paged"]], ids=["ops", "paged"])
def test_the_scheduler_refuses_compiled_ops_without_a_cpp_compiler(tmp_path, flags):
    """No C++ compiler on PATH (and no CXX): one line naming the flag and what to install, exit 2,
    before any model loads (torch.compile would otherwise fail at the first prefill; the paged
    kernel could not be built)."""
    env = {k: v for k, v in os.environ.items() if k != "CXX"} | {"PATH": str(tmp_path)}
    argv = [sys.executable, "-m", "pdlb.services.scheduler.main", "--port", "0", *flags]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 2, run.stdout + run.stderr
    assert run.stderr.startswith(f"pdlb-scheduler: {' '.join(flags)} needs a C++ compiler"), run.stderr
    assert "apt-get install g++" in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr


@pytest.mark.parametrize(
    "ops",
    [
        "eager",
        pytest.param("compiled", marks=NEEDS_COMPILER),
        pytest.param("paged", marks=NEEDS_PAGED_KERNEL),
        pytest.param("paged+fused", marks=[NEEDS_PAGED_KERNEL, NEEDS_FUSED_OPS]),
        pytest.param("fused", marks=NEEDS_FUSED_OPS),
    ],
)
async def test_smollm2_greedy_tokens_match_transformers_through_the_engine(
    smollm2, smollm2_reference, smollm2_runner, ops
):
    """Chunked prefill (7-token chunks), three requests batched, then the same prompts again with
    their prefixes in the prefix cache: every run's tokens equal transformers' greedy generation,
    with the element-wise ops eager or compiled (compiled_ops.py), or the decode rows attending
    through the paged kernel (paged_attention_cpu.py), the element-wise ops of every step fused in
    C++ (decode_ops_cpu.py), or both."""
    _, tokenizer = smollm2
    reference, _ = smollm2_reference
    prompts = [
        tokenizer.encode_chat([("user", "What is the capital of France?")]),
        tokenizer.encode_chat([("user", "Name a primary colour.")]),
        tokenizer.encode("The quick brown fox"),
    ]
    new = 10
    expected = []
    for ids in prompts:
        out = reference.generate(torch.tensor([ids]), max_new_tokens=new, do_sample=False)
        expected.append(out[0, len(ids) :].tolist())
    engine = Engine(smollm2_runner, EngineLimits(4096, 8, 7, 16, 1024), page_size=4)
    _compile_into(smollm2_runner, ops == "compiled", paged=ops.startswith("paged"), fused=ops.endswith("fused"))
    engine.start()
    try:
        first = await _run_all(engine, prompts, new, "a")  # the chats share their system prompt already
        hits = engine.cache_hit_tokens
        again = await _run_all(engine, prompts, new, "b")
        assert engine.cache_hit_tokens - hits > sum(len(p) for p in prompts) // 2  # prefixes came from the cache
    finally:
        await engine.close()
        _back_to_defaults(smollm2_runner)
    for got in (first, again):
        for tokens, want in zip(got, expected, strict=True):
            assert tokens[: len(want)] == want  # transformers stops at EOS; the engine ignores it here
    assert "Paris" in tokenizer.decode(first[0])


@pytest.mark.parametrize(
    "attention",
    [
        "sdpa",
        pytest.param("paged", marks=NEEDS_PAGED_KERNEL),
        pytest.param("paged+fused", marks=[NEEDS_PAGED_KERNEL, NEEDS_FUSED_OPS]),
    ],
)
def test_smollm2_batched_decode_logits_match_transformers(smollm2, smollm2_reference, smollm2_runner, attention):
    """Three prompts of different lengths prefilled, then decoded together one token a step (fed
    transformers' greedy tokens): every decode step's logits of every row within LOGIT_TOLERANCE of
    transformers' logits at that position, through SDPA or the paged kernel, and with the decode
    steps' element-wise ops fused (decode_ops_cpu.py)."""
    _, tokenizer = smollm2
    reference, _ = smollm2_reference
    prompts = [tokenizer.encode(t) for t in TEXTS[:3]]
    new = 6
    runner = smollm2_runner
    _compile_into(runner, False, paged=attention.startswith("paged"), fused=attention.endswith("fused"))
    slots = [runner.allocate(len(ids) + new) for ids in prompts]
    try:
        wanted = []
        for ids in prompts:
            with torch.no_grad():
                out = reference.generate(
                    torch.tensor([ids]),
                    max_new_tokens=new,
                    do_sample=False,
                    output_logits=True,
                    return_dict_in_generate=True,
                )
            wanted.append((out.sequences[0, len(ids) :].tolist(), [step[0] for step in out.logits]))
        for ids, row in zip(prompts, slots, strict=True):
            runner.model([SeqChunk(ids, 0, row)], runner.pool)
        for step in range(1, new):
            chunks = [
                SeqChunk([tokens[step - 1]], len(ids) + step - 1, row)
                for ids, row, (tokens, _) in zip(prompts, slots, wanted, strict=True)
            ]
            logits = runner.model(chunks, runner.pool)
            for b, (_, theirs) in enumerate(wanted):
                assert (logits[b] - theirs[step]).abs().max().item() < LOGIT_TOLERANCE, (b, step)
    finally:
        for row in slots:
            runner.release(row)
        _back_to_defaults(runner)


def _prefill_logits(runner: TorchRunner, ids: list[int]) -> torch.Tensor:
    slots = runner.allocate(len(ids))
    try:
        return runner.model([SeqChunk(ids, 0, slots)], runner.pool)[0]
    finally:
        runner.release(slots)


async def _run_all(engine: Engine, prompts: list[list[int]], new: int, tag: str) -> list[list[int]]:
    seqs = [
        Sequence(request_id=f"{tag}{i}", prompt=p, max_new_tokens=new, ignore_eos=True) for i, p in enumerate(prompts)
    ]
    for s in seqs:
        engine.submit(s)

    async def collect(s: Sequence) -> list[int]:
        tokens: list[int] = []
        while True:
            out = await s.outbox.get()
            tokens += out.token_ids
            if out.finish_reason:
                return tokens

    return await asyncio.gather(*[collect(s) for s in seqs])


def _write_hf_dir(path, kind: str) -> None:
    """A small random Llama or Qwen2 checkpoint in Hugging Face's format, with a byte-level BPE
    tokenizer trained on a few sentences (nothing downloaded)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(TEXTS * 20, trainer)
    path.mkdir()
    backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    shape = dict(
        vocab_size=backend.get_vocab_size(),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=50000.0,
        rms_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(3)
    if kind == "llama":
        config = transformers.LlamaConfig(**shape, tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.Qwen2Config(**shape, tie_word_embeddings=True)
        model = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():  # larger weights than the default init, so differences would show
        for param in model.parameters():
            param.normal_(0, 0.2)
    model.save_pretrained(str(path), safe_serialization=True)


def test_fixed_shape_decode_plans_match_the_eager_path(smollm2, smollm2_runner):
    """What the CUDA graphs replay (a decode step padded to a batch and context bucket, its index
    tensors refilled in place) gives the eager path's logits, and padding rows touch slot 0 only."""
    _, tokenizer = smollm2
    runner = smollm2_runner
    graphs = DecodeGraphs(runner.model, runner.pool, max_batch=8, max_context=4096, capture=False)
    prompts = [tokenizer.encode(t) for t in TEXTS[:3]]
    chunks = []
    for ids in prompts:  # prefill eagerly, then one decode token each at different context lengths
        slots = runner.allocate(len(ids) + 1)
        runner.model([SeqChunk(ids, 0, slots)], runner.pool)
        chunks.append(SeqChunk([ids[-1]], len(ids), slots))
    try:
        assert graphs.bucket(chunks) == (4, 128)  # 3 rows padded to 4, contexts up to 128
        assert graphs.bucket([*chunks[:2], SeqChunk([1, 2], 0, [1, 2])]) is None  # a prefill chunk: eager
        before = runner.pool.k[:, 1:].clone()
        fixed = graphs.run(chunks, graphs.bucket(chunks)).clone()
        written = torch.tensor([c.slots[c.start_pos] for c in chunks])
        untouched = torch.ones(runner.pool.capacity, dtype=torch.bool)
        untouched[written - 1] = False
        assert torch.equal(runner.pool.k[:, 1:][:, untouched], before[:, untouched])
        eager = runner.model(chunks, runner.pool)
        assert fixed.shape == eager.shape == (3, tokenizer.vocab_size)
        assert (fixed - eager).abs().max().item() < 1e-3
        assert fixed.argmax(-1).tolist() == eager.argmax(-1).tolist()
        again = graphs.run(chunks[1:], graphs.bucket(chunks[1:]))  # the same plan, refilled with fewer rows
        assert (again - eager[1:]).abs().max().item() < 1e-3
    finally:
        for chunk in chunks:
            runner.release(chunk.slots)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("fixed_plans", [False, True], ids=["eager", "decode-plans"])
@pytest.mark.parametrize(
    "attention",
    [
        "sdpa",
        pytest.param("paged", marks=NEEDS_PAGED_KERNEL),
        pytest.param("paged+fused", marks=[NEEDS_PAGED_KERNEL, NEEDS_FUSED_OPS]),
    ],
)
async def test_random_hf_checkpoint_matches_transformers(tmp_path, kind, fixed_plans, attention):
    _write_hf_dir(tmp_path / kind, kind)
    source = resolve(str(tmp_path / kind))
    assert source.model_id == kind and source.kind == "hf"
    tokenizer = source.tokenizer()
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / kind), dtype=torch.float32).eval()
    model = LlamaModel(source.config())
    model.load_weights(source.state_dict())
    runner = TorchRunner(
        model,
        2048,
        eos_token_id=tokenizer.eos_token_id,
        decode_graphs=fixed_plans,
        paged_attention=attention.startswith("paged"),
        decode_ops=attention.endswith("fused"),
        prefill_ops=attention.endswith("fused"),
    )
    assert (runner.model.decode_attention is not None) == attention.startswith("paged")
    assert (runner.model.decode_ops is not None) == attention.endswith("fused")
    assert (runner.model.prefill_ops is not None) == attention.endswith("fused")
    assert runner.pool.k.shape[2] == 2  # the pool holds the 2 KV heads only, not the 4 query heads
    ids = tokenizer.encode("Hello world! The year 2024")
    with torch.no_grad():
        theirs = reference(torch.tensor([ids])).logits[0, -1]
    assert (_prefill_logits(runner, ids) - theirs).abs().max().item() < LOGIT_TOLERANCE
    expected = reference.generate(
        torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
    )[0, len(ids) :].tolist()
    engine = Engine(runner, EngineLimits(2048, 4, 5, 8, 512), page_size=4)
    engine.start()
    try:
        got = await _run_all(engine, [ids, [*ids[:5], 7, 8, 9]], 12, kind)
    finally:
        await engine.close()
    assert got[0] == expected
    if fixed_plans:
        assert runner.graphs is not None and runner.graphs.plans_built >= 1  # decode steps took that path


def test_unsupported_checkpoints_fail_with_what_is_unsupported(tmp_path):
    _write_hf_dir(tmp_path / "m", "llama")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    for change, words in [
        ({"architectures": ["GPT2LMHeadModel"]}, "architecture GPT2LMHeadModel is not supported"),
        ({"quantization_config": {"quant_method": "awq"}}, "quantised checkpoints (awq)"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling 'yarn'"),
    ]:
        (tmp_path / "m" / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(UnsupportedModel, match=re.escape(words)):
            resolve(str(tmp_path / "m")).config()
    # what was wrong with the value: a path that is not there, a file of another kind, an unknown name
    # (all three read "not smollm2-135m-instruct, ..." before, a missing file too)
    kinds = "smollm2-135m-instruct, tiny-random, a .gguf file or a Hugging Face model directory"
    with pytest.raises(UnsupportedModel, match=re.escape(f"nowhere': no such file or directory (a model is {kinds})")):
        resolve(str(tmp_path / "nowhere"))
    with pytest.raises(UnsupportedModel, match=re.escape("'missing.gguf': no such file or directory")):
        resolve("missing.gguf")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(UnsupportedModel, match=re.escape("weights.bin': a file, but not a .gguf one")):
        resolve(str(tmp_path / "weights.bin"))
    with pytest.raises(UnsupportedModel, match=re.escape(f"--model 'nosuchmodel': not {kinds}")):
        resolve("nosuchmodel")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnsupportedModel, match=re.escape("needs config.json, tokenizer.json and")):
        resolve(str(tmp_path / "empty")).tokenizer()


def test_gguf_metadata_cache_skips_parsing_and_survives_a_torn_file(tmp_path, smollm2):
    from pdlb.models.gguf_file import GGUFCheckpoint

    source, reference_tokenizer = smollm2
    first = GGUFCheckpoint(source.path, tmp_path)
    config, tokenizer = first.config, first.tokenizer()
    [cached] = list(tmp_path.glob("*.json"))
    again = GGUFCheckpoint(source.path, tmp_path)
    assert again.config == config == source.config()
    text = "Hello, wörld! 123 🎉 <|im_start|>"
    assert again.tokenizer().encode(text) == tokenizer.encode(text) == reference_tokenizer.encode(text)
    assert again.tokenizer().apply_chat_template([("user", "hi")]) == tokenizer.apply_chat_template([("user", "hi")])
    assert "reader" not in again.__dict__  # the GGUF metadata was not parsed
    cached.write_text(cached.read_text()[:1000])  # torn by a crash
    rebuilt = GGUFCheckpoint(source.path, tmp_path)
    assert rebuilt.config == config and "reader" in rebuilt.__dict__
    assert GGUFCheckpoint(source.path, tmp_path).tokenizer().encode(text) == tokenizer.encode(text)


def test_decode_graph_buckets_and_what_runs_eagerly():
    from pdlb.engines.torch.decode_graphs import MAX_GRAPH_SLOTS, batch_bucket, context_bucket
    from pdlb.engines.torch.model import KVPool
    from pdlb.models.config import LlamaConfig

    model = LlamaModel(LlamaConfig(64, 16, 32, 1, 2, 1, 8, max_position=4096))
    graphs = DecodeGraphs(model, KVPool(model.kv_shape(), 16, torch.device("cpu"), torch.float32), 32, 2048, False)

    def decode(rows: int, context: int) -> list[SeqChunk]:
        return [SeqChunk([1], context - 1, list(range(context))) for _ in range(rows)]

    assert [batch_bucket(n, 256) for n in (1, 3, 5, 13, 33, 200, 256, 257)] == [1, 4, 8, 16, 48, 224, 256, None]
    assert [context_bucket(n) for n in (1, 128, 129, 1000, 4096)] == [128, 128, 256, 1024, 4096]
    assert graphs.bucket(decode(3, 100)) == (4, 128)
    assert graphs.bucket(decode(33, 100)) is None  # above --cuda-graph-max-batch
    assert graphs.bucket(decode(2, 3000)) is None  # above the longest context it captures
    assert graphs.bucket([]) is None
    assert 256 * 4096 <= MAX_GRAPH_SLOTS < 256 * 8192  # the biggest graph: 256 rows x 4k context


def test_rotary_frequencies_stay_float32_when_the_model_is_cast():
    """Rounded to bfloat16 the rotary frequencies would be off by up to 0.4%: a radian by position ~400."""
    from pdlb.engines.torch.llama import rope_inv_freq
    from pdlb.models.config import LlamaConfig

    model = LlamaModel(LlamaConfig(64, 16, 32, 1, 2, 1, 8, max_position=4096)).to(torch.bfloat16)
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.inv_freq.dtype == torch.float32 and torch.equal(model.inv_freq, rope_inv_freq(model.config))
    assert model.inv_freq.to(torch.bfloat16).float().ne(model.inv_freq).any()  # a cast would have changed it


# bfloat16 against float32 transformers: bfloat16 rounding, not summation order. Measured on the
# three texts below: 0.29-0.51 for pdlb, 0.20-0.33 for transformers' own bfloat16 (largest |logit|
# ~20); the bound is one logit, 5% of the largest.
BF16_LOGIT_TOLERANCE = 1.0


def test_smollm2_bfloat16_logits_within_the_stated_bound_of_transformers(smollm2, smollm2_reference):
    """bfloat16 weights, activations and KV: logits within BF16_LOGIT_TOLERANCE of transformers'
    float32 ones, the same next token, and the same greedy answer to the reference chat prompt
    (greedy tokens of other prompts part at near-ties, as transformers' own bfloat16 does)."""
    source, tokenizer = smollm2
    reference, _ = smollm2_reference
    model = LlamaModel(source.config())
    model.load_weights(source.state_dict())
    runner = TorchRunner(model, 1024, dtype=torch.bfloat16, eos_token_id=tokenizer.eos_token_id)
    assert runner.pool.k.dtype == torch.bfloat16
    for text in TEXTS[:3]:
        ids = tokenizer.encode(text)
        ours = _prefill_logits(runner, ids)
        with torch.no_grad():
            theirs = reference(torch.tensor([ids])).logits[0, -1]
        assert (ours - theirs).abs().max().item() < BF16_LOGIT_TOLERANCE, text
        assert int(ours.argmax()) == int(theirs.argmax()), text
    ids = tokenizer.encode_chat([("user", "What is the capital of France?")])
    want = reference.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids) :].tolist()
    slots = runner.allocate(len(ids) + 8)
    got = [int(runner.model([SeqChunk(ids, 0, slots)], runner.pool)[0].argmax())]
    while len(got) < len(want):
        logits = runner.model([SeqChunk([got[-1]], len(ids) + len(got) - 1, slots)], runner.pool)[0]
        got.append(int(logits.argmax()))
    runner.release(slots)
    assert got == want and "Paris" in tokenizer.decode(got)


def test_cpu_packed_linears_give_the_plain_linears_logits(smollm2, smollm2_runner):
    """The runner packs every linear layer (and the tied logits head) for oneDNN on a CPU where
    torch supports it; logits equal those of the same weights through F.linear, to float rounding."""
    from pdlb.engines.torch import packed_linear

    source, tokenizer = smollm2
    if not packed_linear.supported(torch.float32):
        pytest.skip("this torch build has no oneDNN: linears stay unpacked")
    assert smollm2_runner.packed_linears == 4 * source.config().num_layers  # qkv, o, gate_up, down per layer
    assert isinstance(smollm2_runner.model.layers[0].qkv_proj, packed_linear.PackedLinear)
    assert smollm2_runner.model.tied_head is not None
    model = LlamaModel(source.config())
    model.load_weights(source.state_dict())
    plain = TorchRunner(model, 1024, eos_token_id=tokenizer.eos_token_id, pack_weights=False)
    assert plain.packed_linears == 0 and isinstance(plain.model.layers[0].qkv_proj, torch.nn.Linear)
    for text in TEXTS[:2]:
        ids = tokenizer.encode(text)
        assert (_prefill_logits(smollm2_runner, ids) - _prefill_logits(plain, ids)).abs().max().item() < 1e-3


def test_vllm_servers_pdlb_starts_get_the_same_dtype_as_pdlbs_engine():
    """`pdlb up --engine vllm` reads the CPU flags itself (no torch in the CLI); torch's own probes
    are the reference."""
    from pdlb.cli.main import build_parser
    from pdlb.engines.torch import dtypes
    from pdlb.engines.vllm.server import cpu_dtype

    assert cpu_dtype() == ("bfloat16" if dtypes.cpu_has_native_bf16() else "float32")
    assert build_parser().parse_args(["up"]).vllm_dtype == "auto"


def test_dtype_auto_is_bfloat16_only_where_the_cpu_multiplies_it_natively(monkeypatch):
    from pdlb.engines.torch import dtypes
    from pdlb.services.scheduler.main import build_parser

    assert build_parser().parse_args([]).dtype == "auto"
    native = dtypes.cpu_has_native_bf16()
    assert dtypes.resolve("auto", "cpu") == (torch.bfloat16 if native else torch.float32)
    assert dtypes.emulated_on(torch.bfloat16, "cpu") is not native
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert dtypes.resolve("auto", "cpu") == torch.bfloat16 and not dtypes.emulated_on(torch.bfloat16, "cpu")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert dtypes.resolve("auto", "cpu") == torch.float32 and dtypes.emulated_on(torch.bfloat16, "cpu")
    assert dtypes.resolve("auto", "cuda:0") == torch.float32
    assert dtypes.resolve("bfloat16", "cpu") == torch.bfloat16  # asked for by name: honoured, with a warning
    with pytest.raises(ValueError, match="unknown dtype 'fp8': one of auto, bfloat16, float16, float32"):
        dtypes.resolve("fp8", "cpu")
