"""The one atomic writer: whole files or nothing, for files and directories."""

from __future__ import annotations

from pathlib import Path

import pytest

from envs.io import atomic_write


def _leftovers(directory: Path, keep: str) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name != keep)


def test_writes_a_file_and_keeps_the_target_suffix(tmp_path):
    seen = []

    def write(tmp: str) -> None:
        seen.append(Path(tmp).name)
        Path(tmp).write_text("whole")

    path = atomic_write(tmp_path / "sub" / "plot.png", write)
    assert path.read_text() == "whole" and seen == ["plot.png"]  # savefig/SB3 pick the format by suffix
    assert _leftovers(path.parent, "plot.png") == []


def test_a_failing_writer_leaves_nothing_behind(tmp_path):
    def write(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(tmp_path / "new.json", write)
    assert list(tmp_path.iterdir()) == []


def test_an_existing_target_survives_a_failed_write(tmp_path):
    target = tmp_path / "summary.json"
    target.write_text("old")

    def write(tmp: str) -> None:
        Path(tmp).write_text("new, half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, write)
    assert target.read_text() == "old" and _leftovers(tmp_path, "summary.json") == []
    atomic_write(target, lambda tmp: Path(tmp).write_text("new"))
    assert target.read_text() == "new"


def test_writes_a_directory(tmp_path):
    def write(tmp: str) -> None:
        Path(tmp).mkdir()
        (Path(tmp) / "config.json").write_text("{}")

    out = atomic_write(tmp_path / "model", write)
    assert (out / "config.json").read_text() == "{}" and _leftovers(tmp_path, "model") == []
