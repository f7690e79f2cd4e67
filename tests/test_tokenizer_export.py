"""The packaged model's tokenizer, exported as a Hugging Face directory, tokenises exactly as pdlb's
own tokenizer does when `transformers` loads it from the path (what aiperf does), with no hub."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pdlb.models.catalog import SMOLLM2, resolve
from pdlb.models.config import UnsupportedModel
from pdlb.models.tokenizer_export import export_tokenizer

TEXTS = [
    "What is the capital of France?",
    "  leading spaces, digits 1234567 and émojis 🙂\nnew line",
    "<|im_start|>user\nspecial tokens inline<|im_end|>",
]


def test_exported_tokenizer_loads_in_transformers_and_matches(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a load from the directory must not need the hub
    source = resolve(SMOLLM2)
    mine = source.tokenizer()
    export_tokenizer(source, tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS:
        assert theirs.encode(text) == mine.encode(text), text
        assert theirs.decode(mine.encode(text), skip_special_tokens=True) == mine.decode(mine.encode(text))
    chat = [("system", "Be brief."), ("user", "Hi there")]
    rendered = theirs.apply_chat_template(
        [{"role": r, "content": c} for r, c in chat], add_generation_prompt=True, tokenize=False
    )
    assert rendered == mine.apply_chat_template(chat)
    assert theirs.eos_token_id == mine.eos_token_id
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == source.config().max_position


def test_toy_model_is_refused_with_a_reason(tmp_path):
    with pytest.raises(UnsupportedModel, match="no Hugging Face tokenizer"):
        export_tokenizer(resolve("tiny-random"), tmp_path)


def test_cli_writes_the_directory(tmp_path):
    out = tmp_path / "tok"
    done = subprocess.run(
        [sys.executable, "-m", "pdlb.cli.main", "export-tokenizer", str(out)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    refused = subprocess.run(
        [sys.executable, "-m", "pdlb.cli.main", "export-tokenizer", str(out), "--model", "tiny-random"],
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 2 and "byte-level toy" in refused.stderr
