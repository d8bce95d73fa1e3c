"""Atomic writes: the file appears whole with normal permissions, or not at all."""

import os
import stat

import pytest

from data.atomic import atomic_path


def test_success_replaces_the_file_with_plain_permissions(tmp_path):
    target = tmp_path / "sub" / "out.json"
    with atomic_path(target) as temp:
        assert temp.parent == target.parent and not target.exists()
        temp.write_text("new")
    mask = os.umask(0)
    os.umask(mask)
    assert target.read_text() == "new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask  # not mkstemp's 0600
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]


def test_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as temp:
        temp.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
