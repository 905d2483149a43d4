"""bench/pretokenize.py runs end to end on a small corpus and reports consistent numbers.

Without $MLXFLOW_TEST_DATA (removed here on purpose): the generated text and a trained BPE.
One run of about 20 s (2 MiB corpus, one round), shared by the tests below.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "pretokenize.py"
FINAL = re.compile(r"^pretokenize / raw encode_batch: ([0-9.]+)x\s+peak memory 2x-input / 1x-input: ([0-9.]+)$", re.M)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretokenize-bench") / "result.json"
    env = {k: v for k, v in os.environ.items() if k != "MLXFLOW_TEST_DATA"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--mb", "2", "--repeats", "1", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_falls_back_to_generated_text_and_a_trained_bpe(bench):
    _, res = bench
    assert res["corpus"]["text"].startswith("generated")
    assert res["tokenizer"].startswith("4096-token BPE")
    assert res["vocab_size"] == 4096
    corpus = res["corpus"]
    assert 0 < corpus["bytes_1x"] <= 2 << 20 and corpus["bytes_2x"] == 2 * corpus["bytes_1x"]
    assert corpus["rows"] > corpus["paragraphs"] > 0  # the paragraphs were cycled to fill 2 MiB


def test_both_sides_count_the_same_tokens(bench):
    _, res = bench
    tokens = res["reference"]["tokens"]
    assert tokens > 0 and res["pretokenize"]["tokens"] == tokens
    for run in res["pretokenize"]["runs"]:
        assert run["tokens"] == tokens
        assert run["num_docs"] == res["corpus"]["rows"]
        assert run["num_tokens"] == tokens + run["num_docs"]  # one separator per document
        assert sum(run["split_tokens"].values()) == run["num_tokens"] and run["split_tokens"]["val"] > 0
    double = res["pretokenize_2x"]
    assert double["tokens"] == 2 * tokens and double["num_docs"] == 2 * res["corpus"]["rows"]


def test_ratios_are_positive_and_consistent(bench):
    stdout, res = bench
    ref, ours = res["reference"], res["pretokenize"]
    for x in (ref["seconds"], ours["seconds"], ref["tokens_per_s"], ours["tokens_per_s"], res["ratio"],
              res["peak_rss_mb_1x"], res["peak_rss_mb_2x"], res["memory_ratio"]):
        assert _positive(x), x
    assert ours["tokens_per_s"] == pytest.approx(ours["tokens"] / ours["seconds"])
    assert res["ratio"] == pytest.approx(ours["tokens_per_s"] / ref["tokens_per_s"])
    assert res["memory_ratio"] == pytest.approx(res["peak_rss_mb_2x"] / res["peak_rss_mb_1x"])
    assert res["tree_memory_ratio"] is None or _positive(res["tree_memory_ratio"])
    m = FINAL.search(stdout)
    assert m, stdout[-2000:]
    assert float(m.group(1)) == pytest.approx(res["ratio"], abs=0.006)
    assert float(m.group(2)) == pytest.approx(res["memory_ratio"], abs=0.006)
