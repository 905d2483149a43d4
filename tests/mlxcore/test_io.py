"""Files written all-or-nothing, and the run's `model` link."""

from __future__ import annotations

import json
import os

import pytest

from mlxcore.io import link, write_jsonl


def test_write_jsonl_replaces_the_file_whole_or_not_at_all(tmp_path):
    path = tmp_path / "answers.jsonl"
    write_jsonl(path, [{"a": 1}, {"a": 2}])
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"a": 1}, {"a": 2}]

    def rows():
        yield {"a": 3}
        raise RuntimeError("generator died mid-write")

    with pytest.raises(RuntimeError):
        write_jsonl(path, rows())
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"a": 1}, {"a": 2}]


def test_link_points_at_the_latest_target_relatively(tmp_path):
    for name in ("sft-aaa", "sft-bbb"):
        (tmp_path / name / "model").mkdir(parents=True)
        (tmp_path / name / "model" / "config.json").write_text(name)
    link(tmp_path / "sft-aaa" / "model", tmp_path / "model")
    link(tmp_path / "sft-bbb" / "model", tmp_path / "model")
    assert os.readlink(tmp_path / "model") == os.path.join("sft-bbb", "model")  # survives moving the run dir
    assert (tmp_path / "model" / "config.json").read_text() == "sft-bbb"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "sft-aaa", "sft-bbb"]  # no temp link left


def _writer(parent, hold: bool):
    """A real process that makes a temp dir beside parent/out the way every writer does; with
    hold it stays alive (a writer mid-write), else it dies at once (killed mid-write)."""
    import subprocess
    import sys

    code = ("import sys, time; from pathlib import Path; from mlxcore.io import tmp_path; "
            "p = tmp_path(Path(sys.argv[1]) / 'out'); p.mkdir(); (p / 'shard.bin').write_bytes(b'x' * 100); "
            "print(p, flush=True); time.sleep(60 if sys.argv[2] == '1' else 0)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(parent), "1" if hold else "0"], stdout=subprocess.PIPE,
                            text=True)
    path = proc.stdout.readline().strip()
    if not hold:
        proc.wait()
    return proc, path


def test_only_temp_files_of_dead_writers_are_stale(tmp_path):
    from pathlib import Path

    from mlxcore.io import clean_stale_tmp, temp_files, tmp_path as make_tmp

    dead_proc, dead = _writer(tmp_path, hold=False)
    live_proc, live = _writer(tmp_path, hold=True)
    try:
        mine = make_tmp(tmp_path / "mine")
        mine.write_text("this process, still running")
        foreign = tmp_path / ".tmp-out~otherhost~1~1~1"  # made on another machine sharing the dir
        foreign.mkdir()
        (tmp_path / "sub").mkdir()
        nested_proc, nested = _writer(tmp_path / "sub", hold=False)
        states = {str(p): s for p, s in temp_files(tmp_path, recursive=True)}
        assert states == {dead: "stale", nested: "stale", live: "writing", str(mine): "writing",
                          str(foreign): "unknown"}
        assert clean_stale_tmp(tmp_path) == [Path(dead)]  # one level unless recursive
        assert clean_stale_tmp(tmp_path, recursive=True) == [Path(nested)]
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([Path(live).name, mine.name, foreign.name, "sub"])
    finally:
        live_proc.kill()
        live_proc.wait()
    assert clean_stale_tmp(tmp_path) == [Path(live)]  # its writer is gone now


def test_the_clean_command_lists_and_removes_stale_temp_files(tmp_path, capsys):
    from mlxcore.cli import main

    (tmp_path / "run").mkdir()
    _, dead = _writer(tmp_path / "run", hold=False)
    assert main(["clean", str(tmp_path / "run"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"stale          0.0 MiB  {dead}" in out and os.path.exists(dead)
    assert main(["clean", str(tmp_path / "run")]) == 0
    assert "removed 1 stale temp file(s)" in capsys.readouterr().out and not os.path.exists(dead)
