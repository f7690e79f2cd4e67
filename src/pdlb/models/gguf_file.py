"""Read a GGUF checkpoint of a Llama-family model: architecture, tokenizer and dequantised weights."""

from __future__ import annotations

import dataclasses
import json
import logging
from functools import cached_property
from pathlib import Path

from pdlb.models import file_cache
from pdlb.models.config import LlamaConfig, UnsupportedModel

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "mistral")
# GGUF tensor types pdlb dequantises (gguf-py does the arithmetic); others are refused at start.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
# Pre-tokenizer splits of byte-level BPE vocabularies, by llama.cpp's `tokenizer.ggml.pre` name.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"  # words and up to 3 digits
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"  # punctuation, newlines, spaces
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
PRE_TOKENIZERS = {"gpt2": None, "default": None, "smollm": "digits", "llama-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types that are special (never split by BPE)
META_VERSION = 2  # bump when what the metadata cache holds changes
MAX_META_FILES = 16  # the metadata cache keeps this many files (about 2 MB each), newest used


class GGUFCheckpoint:
    """A GGUF file. Parsing all of its metadata (gguf-py reads every field, the 100k-entry
    vocabulary included) takes seconds, so the architecture and tokenizer are cached as JSON in
    `meta_cache` keyed by the file's path, size and modification time: a restart, and every service
    after the first, opens the file's metadata only when the weights themselves are read."""

    def __init__(self, path: Path, meta_cache: Path | None = None) -> None:
        self.path = path
        self.meta_cache = meta_cache
        self._meta = self._load_meta()
        if self._meta is not None:
            self.arch = self._meta["arch"]
        else:
            self.arch = self._get("general.architecture")
            if self.arch not in SUPPORTED_ARCHITECTURES:
                raise UnsupportedModel(
                    f"{path.name}: architecture {self.arch!r} is not supported "
                    f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
                )

    @cached_property
    def reader(self):
        import gguf

        try:
            return gguf.GGUFReader(str(self.path))
        except Exception as exc:
            raise UnsupportedModel(f"{self.path} is not a readable GGUF file: {exc}") from exc

    def _get(self, key: str, default=None):
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    # the metadata cache ------------------------------------------------------------------------
    def _meta_file(self) -> Path | None:
        if self.meta_cache is None:
            return None
        return file_cache.cached_path(self.meta_cache, self.path, ".json", version=str(META_VERSION))

    def _load_meta(self) -> dict | None:
        file = self._meta_file()
        if file is None or not file.is_file():
            return None
        try:
            meta = json.loads(file.read_text())
            file_cache.touch(file)
            return meta
        except (OSError, ValueError) as exc:  # torn or foreign: rebuilt from the file
            log.warning("model metadata cache %s unreadable (%s); reading the GGUF file", file, exc)
            return None

    def _save_meta(self, config: LlamaConfig, tokenizer) -> dict | None:
        file = self._meta_file()
        if file is None:
            return None
        meta = {
            "arch": self.arch,
            "config": dataclasses.asdict(config),
            "tokenizer": tokenizer.backend.to_str(),
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "chat_template": tokenizer.chat_template,
            "adds_bos": tokenizer.adds_bos,
        }
        try:
            file_cache.write_atomically(file, lambda partial: partial.write_text(json.dumps(meta)))
            file_cache.evict(file.parent, "*.json", max_files=MAX_META_FILES)
        except OSError as exc:
            log.warning("could not write the model metadata cache %s: %s", file, exc)
        return meta

    @cached_property
    def config(self) -> LlamaConfig:
        if self._meta is not None:
            fields = dict(self._meta["config"])
            if fields.get("rope_llama3") is not None:
                fields["rope_llama3"] = tuple(fields["rope_llama3"])
            return LlamaConfig(**fields)
        config = self._read_config()
        if self.meta_cache is not None:
            try:
                self._meta = self._save_meta(config, self._read_tokenizer())
            except UnsupportedModel:
                pass  # said again, by tokenizer(), to whoever asks for it
        return config

    def _read_config(self) -> LlamaConfig:
        a = self.arch
        heads = int(self._get(f"{a}.attention.head_count"))
        hidden = int(self._get(f"{a}.embedding_length"))
        names = {t.name for t in self.reader.tensors}
        vocab = self._get(f"{a}.vocab_size") or len(self._get("tokenizer.ggml.tokens"))
        scaling = self._get(f"{a}.rope.scaling.type")
        if scaling not in (None, "none"):
            raise UnsupportedModel(f"{self.path.name}: rope scaling {scaling!r} is not supported")
        return LlamaConfig(
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(self._get(f"{a}.feed_forward_length")),
            num_layers=int(self._get(f"{a}.block_count")),
            num_heads=heads,
            num_kv_heads=int(self._get(f"{a}.attention.head_count_kv", heads)),
            head_dim=int(self._get(f"{a}.rope.dimension_count", hidden // heads)),
            rope_theta=float(self._get(f"{a}.rope.freq_base", 10000.0)),
            rms_norm_eps=float(self._get(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
            max_position=int(self._get(f"{a}.context_length", 4096)),
            tie_embeddings="output.weight" not in names,
            attention_bias="blk.0.attn_q.bias" in names,
        )

    def tokenizer(self):
        if self._meta is None:
            self.config  # noqa: B018 - reads the file and fills the cache
        if self._meta is None:  # no cache directory, or an unsupported tokenizer (it says which)
            return self._read_tokenizer()
        from tokenizers import Tokenizer as Backend

        from pdlb.common.tokenizer import BPETokenizer

        meta = self._meta
        return BPETokenizer(
            Backend.from_str(meta["tokenizer"]),
            eos_token_id=meta["eos_token_id"],
            bos_token_id=meta["bos_token_id"],
            chat_template=meta["chat_template"],
            adds_bos=meta["adds_bos"],
        )

    def _read_tokenizer(self):
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as Backend

        from pdlb.common.tokenizer import BPETokenizer

        kind, pre = self._get("tokenizer.ggml.model"), self._get("tokenizer.ggml.pre", "default")
        if kind != "gpt2":
            raise UnsupportedModel(
                f"{self.path.name}: tokenizer model {kind!r} is not supported (byte-level BPE 'gpt2' is); "
                "use a Hugging Face directory with tokenizer.json instead"
            )
        if pre not in PRE_TOKENIZERS:
            raise UnsupportedModel(
                f"{self.path.name}: pre-tokenizer {pre!r} is not supported ({', '.join(PRE_TOKENIZERS)})"
            )
        tokens = self._get("tokenizer.ggml.tokens")
        merges = [tuple(m.split(" ", 1)) for m in self._get("tokenizer.ggml.merges")]
        backend = Backend(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
        split = PRE_TOKENIZERS[pre]
        # GPT-2's own split runs inside ByteLevel unless a model-specific regex replaces it
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split in (None, "digits"))
        if split == "digits":
            backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        elif split:
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(split), behavior="isolated"), byte_level]
            )
        else:
            backend.pre_tokenizer = byte_level
        backend.decoder = decoders.ByteLevel()
        types = self._get("tokenizer.ggml.token_type") or []
        special = [tokens[i] for i, t in enumerate(types) if t in (_CONTROL, _USER_DEFINED)]
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
        bos = self._get("tokenizer.ggml.bos_token_id")
        return BPETokenizer(
            backend,
            eos_token_id=int(self._get("tokenizer.ggml.eos_token_id")),
            bos_token_id=None if bos is None else int(bos),
            chat_template=self._get("tokenizer.chat_template", "") or "",
            adds_bos=bool(self._get("tokenizer.ggml.add_bos_token", False)),
        )

    def state_dict(self) -> dict:
        """Weights as float32 tensors under Hugging Face names, Q/K rows back in rotate-half order."""
        import numpy as np
        import torch
        from gguf import quants

        c = self.config
        out = {}
        for tensor in self.reader.tensors:
            if tensor.tensor_type.name not in SUPPORTED_TYPES:
                raise UnsupportedModel(
                    f"{self.path.name}: tensor {tensor.name} is {tensor.tensor_type.name}, "
                    f"not one of the supported types {', '.join(SUPPORTED_TYPES)}"
                )
            shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dimensions innermost first
            array = np.asarray(quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)
            name = _hf_name(tensor.name)
            value = torch.from_numpy(array.copy())
            if self.arch != "llama":
                pass  # qwen2's converter keeps Hugging Face's rotary layout
            elif name.endswith(("q_proj.weight", "q_proj.bias")):
                value = _unpermute(value, c.num_heads)
            elif name.endswith(("k_proj.weight", "k_proj.bias")):
                value = _unpermute(value, c.num_kv_heads)
            out[name] = value
        return out


def _unpermute(w, heads: int):
    """llama.cpp's converter interleaves each head's rotary halves; undo it (rows only)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


_GGUF_TO_HF = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _hf_name(name: str) -> str:
    if name.startswith("blk."):
        _, layer, part, kind = name.split(".", 3)
        if part not in _GGUF_TO_HF:
            raise UnsupportedModel(f"GGUF tensor {name} has no place in a Llama-family model")
        return f"model.layers.{layer}.{_GGUF_TO_HF[part]}.{kind}"
    fixed = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    if name in fixed:
        return fixed[name]
    if name == "output.weight":
        return "lm_head.weight"
    if name == "rope_freqs.weight":
        raise UnsupportedModel("GGUF rope_freqs (Llama 3 rope scaling stored as a tensor) is not supported")
    raise UnsupportedModel(f"GGUF tensor {name} has no place in a Llama-family model")
