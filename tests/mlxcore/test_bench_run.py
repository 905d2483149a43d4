"""Bench targets answer and the report aggregates: a checkpoint (batched greedy = one-at-a-time
greedy), an endpoint through a loopback Ollama stand-in whose right answers are known, the
uniform-random baseline, and the report's numbers against hand-computed ones."""

from __future__ import annotations

import base64
import io
import random

import pytest

from mlxcore.bench import report as reports
from mlxcore.bench.run import answer
from mlxcore.bench.suites import make
from mlxcore.config import BenchConfig, BenchTarget, ConfigError
from tests.conftest import hf_model_dir
from tests.ollama_standin import OllamaStandin


def _row(suite, category, correct, valid, tokens, ms):
    return {"id": f"{suite}-{category}-{random.random()}", "suite": suite, "category": category, "reply": "x",
            "parsed": "x", "correct": correct, "valid": valid, "tokens": tokens, "ms": ms}


def test_report_numbers_match_hand_computed_ones():
    ours = [_row("copy", "short", True, True, 10, 100.0), _row("copy", "long", False, True, 30, 300.0),
            _row("sort", "sort", False, False, 20, 100.0), _row("sort", "sort", True, True, 20, 100.0)]
    rand = [_row("copy", "short", False, True, 0, 0.0), _row("copy", "long", False, True, 0, 0.0),
            _row("sort", "sort", False, True, 0, 0.0), _row("sort", "sort", True, True, 0, 0.0)]
    rep = reports.report({"ours": ours, "random": rand})
    o = rep["overall"]["ours"]
    assert o == {"n": 4, "accuracy": 0.5, "invalid_rate": 0.25, "tok_per_s": 80 / 0.6, "ms_per_example": 150.0}
    assert rep["overall"]["random"]["tok_per_s"] is None and rep["overall"]["random"]["accuracy"] == 0.25
    assert rep["suites"]["copy"]["ours"]["accuracy"] == 0.5 and rep["suites"]["sort"]["ours"]["invalid_rate"] == 0.5
    assert rep["categories"]["copy/long"]["ours"] == {"n": 1, "accuracy": 0.0, "invalid_rate": 0.0,
                                                       "tok_per_s": 100.0, "ms_per_example": 300.0}
    tables = reports.tables(rep)
    assert [r["target"] for r in tables["overall"]] == ["ours", "random"]
    assert tables["suites"][1] == {"suite": "sort", "n": 2, "ours accuracy": 0.5, "ours invalid": 0.5,
                                   "random accuracy": 0.5, "random invalid": 0.0}
    md = reports.markdown(rep, "bench x")
    assert md.startswith("### bench x") and "| sort | 2 | 0.500 | 0.500 | 0.500 | 0.000 |" in md


def test_random_baseline_is_reproducible_and_seeded():
    examples = make(["math_mcq", "sort"], 50)
    a = answer(BenchTarget(kind="random"), examples, seed=0)
    assert a == answer(BenchTarget(kind="random"), examples, seed=0)
    assert [r["reply"] for r in a] != [r["reply"] for r in answer(BenchTarget(kind="random"), examples, seed=1)]
    assert all(r["valid"] for r in a) and [r["id"] for r in a] == [e.id for e in examples]


def test_a_checkpoint_answers_in_batches_exactly_as_one_at_a_time(small_data, tmp_path):
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    from mlxcore.models.generate import load_chat

    model_dir = hf_model_dir(tmp_path / "m", small_data["tok"])
    examples = make(["copy", "sort", "json"], 4)
    seen = []
    rows = answer(BenchTarget(kind="checkpoint", path=str(model_dir)), examples, max_tokens=12, batch_size=5,
                  on_progress=lambda done, total: seen.append((done, total)))
    assert seen == [(5, 12), (10, 12), (12, 12)]
    model, tok = load_chat(model_dir)
    for ex, row in zip(examples, rows):  # greedy, one prompt at a time, through mlx-lm's plain generator
        prompt = tok.apply_chat_template([{"role": "user", "content": ex.prompt}], add_generation_prompt=True)
        ids = [r.token for r in stream_generate(model, tok, prompt, max_tokens=12, sampler=make_sampler(temp=0.0))]
        ids = ids[:-1] if ids and ids[-1] in tok.eos_token_ids else ids
        assert row["reply"] == tok.decode(ids) and row["tokens"] == len(ids)
        assert row["ms"] > 0
    assert [r["id"] for r in rows] == [e.id for e in examples]


def test_an_endpoint_is_scored_on_its_replies_and_shares_its_wall_time():
    examples = make(["math_mcq", "copy", "json"], 10)
    gold = {ex.prompt: ex.answer for ex in examples}
    right = {ex.prompt for i, ex in enumerate(examples) if i % 3 == 0}

    def respond(messages):
        prompt = messages[-1]["content"]
        return f"<think>hmm</think>{gold[prompt]}" if prompt in right else "no idea at all"

    with OllamaStandin(answer=respond, delay_s=0.02) as server:
        rows = answer(BenchTarget(kind="ollama", url=server.url, model="qwen3:0.6b", workers=3), examples)
        bodies = [r.body for r in server.log if r.path == "/api/chat"]
    assert [r["correct"] for r in rows] == [ex.prompt in right for ex in examples]
    # "no idea at all" has no option letter and no JSON, but is a (wrong) string to copy
    assert [r["valid"] for r in rows] == [ex.prompt in right or ex.suite == "copy" for ex in examples]
    assert all(b["options"]["temperature"] == 0.0 for b in bodies) and len(bodies) == len(examples)
    # each answer's ms is its share of the wall time, in proportion to its latency (both measured:
    # only their relation is certain): a longer latency never gets a smaller share
    assert all(r["latency_ms"] > 0 and r["ms"] > 0 for r in rows)
    shares = [r["ms"] for r in sorted(rows, key=lambda r: (r["latency_ms"], r["ms"]))]
    assert shares == sorted(shares)
    summary = reports.summarize(rows)
    total_ms, tokens = sum(r["ms"] for r in rows), sum(r["tokens"] for r in rows)
    assert summary["ms_per_example"] == pytest.approx(total_ms / len(rows))
    assert tokens > 0 and summary["tok_per_s"] == pytest.approx(tokens / (total_ms / 1000))


def test_an_unreachable_or_unknown_endpoint_fails_before_any_question():
    from mlxcore.clients.chat import TeacherError
    from tests.ollama_standin import closed_url

    with pytest.raises(TeacherError, match="cannot reach"):
        answer(BenchTarget(kind="ollama", url=closed_url(), model="qwen3:0.6b"), make(["copy"], 2))
    with OllamaStandin() as server, pytest.raises(TeacherError, match="ollama pull"):
        answer(BenchTarget(kind="ollama", url=server.url, model="nope:1b"), make(["copy"], 2))


def test_targets_are_validated_with_clear_messages():
    with pytest.raises(ValueError, match="checkpoint target needs path"):
        BenchTarget(kind="checkpoint")
    with pytest.raises(ValueError, match="openai target needs url"):
        BenchTarget(kind="openai", model="m")
    with pytest.raises(ValueError, match="distinct names"):
        BenchConfig(targets=[BenchTarget(kind="random"), BenchTarget(kind="random")])
    from mlxcore.config import load_config

    with pytest.raises(ConfigError, match="suites"):
        load_config(None, ["suites=[copy,chess]"], cls=BenchConfig)


def test_the_loss_curve_is_a_real_png_in_a_data_uri():
    from matplotlib.image import imread

    from mlxcore.bench.plots import loss_curve, markdown_image

    png = loss_curve([(1, 3.0), (2, 2.5), (3, 2.0)], [(0, 3.2), (3, 2.1)], "demo sft")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert imread(io.BytesIO(png)).shape[:2] == (340, 700)
    md = markdown_image(png, "loss")
    assert md.startswith("![loss](data:image/png;base64,") and base64.b64decode(md[30:-1]) == png
