"""The on-disk cache of files derived from checkpoints (pure file logic, in a temporary folder)."""

from __future__ import annotations

import os

from pdlb.models import file_cache


def test_names_follow_the_source_identity_and_version(tmp_path):
    source = tmp_path / "model.gguf"
    source.write_bytes(b"x" * 10)
    first = file_cache.cached_path(tmp_path / "c", source, ".json")
    assert first == file_cache.cached_path(tmp_path / "c", source, ".json") and first.name.startswith("model-")
    assert file_cache.cached_path(tmp_path / "c", source, ".json", version="2") != first
    source.write_bytes(b"y" * 11)  # replaced: a new name, the old file is never read for it
    assert file_cache.cached_path(tmp_path / "c", source, ".json") != first


def test_atomic_write_and_least_recently_used_eviction(tmp_path):
    for i, name in enumerate(("a", "b", "c")):
        file_cache.write_atomically(tmp_path / f"{name}.bin", lambda p, i=i: p.write_bytes(b"z" * (10 + i)))
        os.utime(tmp_path / f"{name}.bin", (100 + i, 100 + i))
    assert not list(tmp_path.glob("*.tmp"))
    file_cache.touch(tmp_path / "a.bin")  # now the most recently used
    file_cache.evict(tmp_path, "*.bin", max_files=2)
    assert sorted(p.name for p in tmp_path.glob("*.bin")) == ["a.bin", "c.bin"]
    file_cache.evict(tmp_path, "*.bin", budget_bytes=10)
    assert [p.name for p in tmp_path.glob("*.bin")] == ["a.bin"]
