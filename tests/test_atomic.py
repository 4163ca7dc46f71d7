"""The one atomic-write helper: whole file or old file, mode 0644, no temporary left behind."""

from __future__ import annotations

import json
import os
import stat

import pytest

from pneumoedge.atomic import write_atomic, write_json_atomic


def test_writes_bytes_and_text_with_mode_0644(tmp_path):
    os.umask(0o077)  # mkstemp's 0600 must not leak through, whatever the umask
    try:
        write_atomic(tmp_path / "a.bin", b"\x00\x01")
        write_atomic(tmp_path / "b.txt", "é\n")
    finally:
        os.umask(0o022)
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "é\n"
    assert stat.S_IMODE((tmp_path / "a.bin").stat().st_mode) == 0o644
    assert stat.S_IMODE(write_atomic(tmp_path / "c", b"", mode=0o600).stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.txt", "c"]


def test_json_matches_json_dump_layout(tmp_path):
    data = {"b": [1, 2], "a": "ü"}
    write_json_atomic(tmp_path / "m.json", data)
    assert (tmp_path / "m.json").read_text() == json.dumps(data, indent=2) + "\n"


def test_failure_keeps_old_file_and_removes_temporary(tmp_path, monkeypatch):
    target = tmp_path / "keep.json"
    target.write_text("old")

    def broken(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, b"new", durable=True)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.json"]
