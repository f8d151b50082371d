"""`atomic_dir`: a folder is replaced whole or not at all (model saves, proposer folders)."""

from __future__ import annotations

import pytest

from clocmllm.data.atomic import atomic_dir


def test_atomic_dir_replaces_on_success_and_keeps_the_old_on_error(tmp_path):
    out = tmp_path / "model"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("one")
    assert (out / "a.txt").read_text() == "one"
    with pytest.raises(RuntimeError, match="boom"), atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("two")
        raise RuntimeError("boom")
    assert (out / "a.txt").read_text() == "one"  # the old folder, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp folder left
    with atomic_dir(out) as tmp:
        (tmp / "b.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]  # replaced whole, not merged
