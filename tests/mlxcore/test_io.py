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
