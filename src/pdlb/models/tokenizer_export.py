"""A model's tokenizer as a Hugging Face tokenizer directory, for tools that load one by path.

Load generators and evaluation tools (NVIDIA's aiperf, lm-eval, ...) count tokens with
`transformers.AutoTokenizer.from_pretrained(<directory>)`. pdlb builds the tokenizer of a GGUF
checkpoint from the file's metadata; this writes the same tokenizer where such a tool finds it, so
it needs no model hub: `tokenizer.json` (the `tokenizers` model, pre-tokenizer, decoder and special
tokens) and `tokenizer_config.json` (BOS, EOS, whether BOS is prepended, the chat template).
"""

from __future__ import annotations

import json
from pathlib import Path

from pdlb.common.tokenizer import BPETokenizer
from pdlb.models.catalog import ModelSource
from pdlb.models.config import UnsupportedModel

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"


def export_tokenizer(source: ModelSource, directory: Path) -> list[Path]:
    """Write `source`'s tokenizer into `directory` (created if missing; existing files replaced).

    Returns the paths written. Raises UnsupportedModel for the toy byte-level model, which has no
    Hugging Face form.
    """
    tokenizer = source.tokenizer()
    if not isinstance(tokenizer, BPETokenizer):
        raise UnsupportedModel(f"model {source.model_id!r} has no Hugging Face tokenizer to export (byte-level toy)")
    directory.mkdir(parents=True, exist_ok=True)
    special = tokenizer.special_tokens
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": special.get(tokenizer.bos_token_id) if tokenizer.bos_token_id is not None else None,
        "eos_token": special.get(tokenizer.eos_token_id),
        "add_bos_token": tokenizer.adds_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": tokenizer.chat_template or None,
        "model_max_length": _context_length(source),
    }
    written = [directory / TOKENIZER_FILE, directory / CONFIG_FILE]
    tokenizer.backend.save(str(written[0]))
    written[1].write_text(json.dumps({k: v for k, v in config.items() if v is not None}, indent=2) + "\n")
    return written


def _context_length(source: ModelSource) -> int | None:
    try:
        return int(source.config().max_position)
    except (UnsupportedModel, AttributeError):
        return None
