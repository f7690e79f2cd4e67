"""Read a Hugging Face model directory (config.json, *.safetensors, tokenizer.json) of a Llama-family model."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

from pdlb.models.config import LlamaConfig, UnsupportedModel

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}


class HFCheckpoint:
    def __init__(self, path: Path) -> None:
        self.path = path
        missing = [n for n in ("config.json", "tokenizer.json") if not (path / n).is_file()]
        if missing or not list(path.glob("*.safetensors")):
            raise UnsupportedModel(
                f"{path} is not a Hugging Face model directory: it needs config.json, tokenizer.json and "
                f"*.safetensors (missing: {', '.join(missing) or '*.safetensors'})"
            )
        self.raw = json.loads((path / "config.json").read_text())
        archs = self.raw.get("architectures") or []
        if not archs or archs[0] not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModel(
                f"{path.name}: architecture {archs[0] if archs else '(none)'} is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        quant = self.raw.get("quantization_config")
        if quant:
            raise UnsupportedModel(
                f"{path.name}: quantised checkpoints ({quant.get('quant_method', quant)}) are not supported"
            )

    @cached_property
    def config(self) -> LlamaConfig:
        r = self.raw
        heads = int(r["num_attention_heads"])
        llama3 = None
        scaling = r.get("rope_scaling") or (r.get("rope_parameters") or {})
        kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
        if kind == "llama3":
            llama3 = (
                float(scaling["factor"]),
                float(scaling["low_freq_factor"]),
                float(scaling["high_freq_factor"]),
                int(scaling["original_max_position_embeddings"]),
            )
        elif kind != "default":
            raise UnsupportedModel(f"{self.path.name}: rope scaling {kind!r} is not supported (default, llama3 are)")
        theta = r.get("rope_theta", (r.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        max_position = int(r.get("max_position_embeddings", 4096))
        window = r.get("sliding_window") if r.get("use_sliding_window", True) else None
        if window:
            max_position = min(max_position, int(window))  # within the window, sliding = full attention
        arch = SUPPORTED_ARCHITECTURES[r["architectures"][0]]
        return LlamaConfig(
            vocab_size=int(r["vocab_size"]),
            hidden_size=int(r["hidden_size"]),
            intermediate_size=int(r["intermediate_size"]),
            num_layers=int(r["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(r.get("num_key_value_heads") or heads),
            head_dim=int(r.get("head_dim") or r["hidden_size"] // heads),
            rope_theta=float(theta),
            rms_norm_eps=float(r.get("rms_norm_eps", 1e-6)),
            max_position=max_position,
            tie_embeddings=bool(r.get("tie_word_embeddings", False)),
            attention_bias=arch == "qwen2" or bool(r.get("attention_bias", False)),
            rope_llama3=llama3,
        )

    def tokenizer(self):
        from tokenizers import Tokenizer as Backend

        from pdlb.common.tokenizer import BPETokenizer

        backend = Backend.from_file(str(self.path / "tokenizer.json"))
        extra = {}
        if (self.path / "tokenizer_config.json").is_file():
            extra = json.loads((self.path / "tokenizer_config.json").read_text())
        template = extra.get("chat_template") or ""
        if not template and (self.path / "chat_template.jinja").is_file():
            template = (self.path / "chat_template.jinja").read_text()
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), "")

        def token_id(value) -> int | None:
            if isinstance(value, dict):
                value = value.get("content")
            return backend.token_to_id(value) if isinstance(value, str) else None

        eos = self.raw.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0]
        eos = token_id(extra.get("eos_token")) if eos is None else eos
        if eos is None:
            raise UnsupportedModel(f"{self.path.name}: no eos_token_id in config.json or tokenizer_config.json")
        bos = self.raw.get("bos_token_id", token_id(extra.get("bos_token")))
        # Our encode() skips the post-processor, so a BOS it would prepend is added by hand.
        adds_bos = bool(extra.get("add_bos_token", False)) or _post_processor_adds(backend, bos)
        return BPETokenizer(backend, int(eos), None if bos is None else int(bos), template, adds_bos=adds_bos)

    def state_dict(self) -> dict:
        from safetensors.torch import load_file

        out = {}
        for file in sorted(self.path.glob("*.safetensors")):
            out.update({k: v.float() for k, v in load_file(str(file)).items()})
        return out


def _post_processor_adds(backend, bos) -> bool:
    return bos is not None and bool(backend.encode("a", add_special_tokens=True).ids[:1] == [bos])
