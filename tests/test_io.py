"""Atomic writes (veloxseg.io): a target is replaced whole or not at all."""

from pathlib import Path

import pytest

from veloxseg.io import atomic_file, atomic_folder


def test_atomic_file_replaces_the_target_only_when_complete(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "case.nii.gz"
    with atomic_file(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.endswith(".nii.gz") and not target.exists()
        tmp.write_text("first")
    assert target.read_text() == "first" and target.stat().st_mode & 0o777 == 0o644
    with pytest.raises(OSError, match="disk full"), atomic_file(target) as tmp:
        tmp.write_text("half")
        raise OSError("disk full")
    assert target.read_text() == "first" and [p.name for p in target.parent.iterdir()] == ["case.nii.gz"]


def test_atomic_folder_replaces_the_folder_only_when_complete(tmp_path: Path) -> None:
    target = tmp_path / "demo"
    with atomic_folder(target) as tmp:
        (tmp / "a.txt").write_text("first")
        assert not target.exists()
    with pytest.raises(KeyError), atomic_folder(target) as tmp:
        (tmp / "b.txt").write_text("half")
        raise KeyError("killed")
    assert [p.name for p in target.iterdir()] == ["a.txt"]  # the old folder, untouched
    with atomic_folder(target) as tmp:  # the next write starts from an empty folder
        assert list(tmp.iterdir()) == []
        (tmp / "c.txt").write_text("second")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"] and [p.name for p in target.iterdir()] == ["c.txt"]


def test_atomic_folder_undoes_a_replacement_killed_between_its_renames(tmp_path: Path) -> None:
    target = tmp_path / "bundle"
    (tmp_path / ".old-bundle").mkdir()  # killed after moving the older folder aside, before the new one came
    (tmp_path / ".old-bundle" / "a.txt").write_text("first")
    with pytest.raises(KeyError), atomic_folder(target):
        assert (target / "a.txt").read_text() == "first"  # moved back before anything else
        raise KeyError("killed again")
    assert (target / "a.txt").read_text() == "first"
    with atomic_folder(target) as tmp:
        (tmp / "b.txt").write_text("second")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"] and [p.name for p in target.iterdir()] == ["b.txt"]
