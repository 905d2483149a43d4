"""SIGKILL the pipeline at named moments of every stage and re-run it: nothing lost, nothing stale.

Each moment is a state of the run dir, watched every 5 ms from outside (so the kill lands within
milliseconds of it, before Prefect can record anything): a stage's temp dir being written, a
checkpoint mid-training, or a stage's output just finalized (the moment when a finished dir
exists but Prefect has not stored the task's result). Every kill is followed by a re-run that
goes on to the next moment; odd re-runs use a fresh PREFECT_HOME (an empty result store, as
another worker or a cleaned ~/.prefect would have). The last re-run completes: exit 0, weights
byte-identical to the uninterrupted smoke run, and no `.tmp-*` anywhere. The seeded random
version with 20+ kills is `python bench/kill_rerun.py` (its figure is in the README).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.kill_rerun import leftover_tmp, run_pipeline, weights
from tests.conftest import REPO

pytestmark = pytest.mark.slow


def _done(run: Path, pattern: str) -> bool:
    return any(run.glob(f"{pattern}/manifest.json"))


def _writing(run: Path, pattern: str) -> bool:
    return any(run.glob(pattern))


MOMENTS = [  # (name, predicate on <out>/smoke), in pipeline order; one of each kind per stage family
    # (the other finalized stages -- the second pretokenize, sample -- go through the same code as eval's)
    ("data being written", lambda r: _writing(r, ".tmp-data-*")),
    ("tokenizer finalized", lambda r: _done(r, "tokenizer-*")),
    ("pretokenize being written", lambda r: _writing(r, ".tmp-pretokenize-*")),
    ("pretrain mid-training", lambda r: any(r.glob("pretrain-*/checkpoints/step-*/trainer_state.json"))),
    ("pretrain finalized", lambda r: _done(r, "pretrain-*/model")),
    ("sft checkpoint being written", lambda r: _writing(r, "sft-*/checkpoints/.tmp-*")),
    ("sft finalized", lambda r: _done(r, "sft-*/model")),
    ("eval finalized", lambda r: _done(r, "eval-*")),
    ("bench answers finalized", lambda r: any(p.parent.name.split("-")[1] != "report"
                                              for p in r.glob("bench-*/manifest.json"))),
    ("bench report finalized", lambda r: _done(r, "bench-report-*")),
]


def test_killed_at_every_stage_and_rerun_ends_identical_with_nothing_stale(smoke_pipeline, tmp_path):
    from prefect.settings import PREFECT_API_URL

    out = tmp_path / "out"
    base = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(REPO)}
    killed, log = [], tmp_path / "runs.log"
    for i, (name, moment) in enumerate(MOMENTS):
        env = base if i % 2 == 0 else {**base, "PREFECT_HOME": str(tmp_path / f"fresh-home-{i}")}
        r = run_pipeline(out, env, kill_when=lambda o, m=moment: m(o / "smoke"), log=log)
        assert r["killed"] or r["rc"] == 0, (name, r, log.read_text()[-3000:])
        if r["killed"]:
            killed.append(name)
        print(f"{name:28s} {'killed' if r['killed'] else 'ran to the end'} after {r['seconds']:.1f} s")
    assert len(killed) >= 7, killed  # a moment missed (a temp dir too brief to see) is tolerated, not many
    final = run_pipeline(out, {**base, "PREFECT_HOME": str(tmp_path / "fresh-home-final")}, log=log)
    assert final["rc"] == 0 and not final["killed"], log.read_text()[-3000:]
    assert "training failed" not in log.read_text()
    assert weights(out) == smoke_pipeline["weights"], killed
    assert leftover_tmp(out) == []
