"""Bench answering throughput: a checkpoint target (`mlxcore.bench.run.answer`: batched greedy
generation, scoring included) vs mlx-lm's plain generator one question at a time, same model,
same bench questions, same greedy decoding, in one run.

    python bench/bench_targets.py --model runs/demo/model          # the demo's model, 7 suites x 20
    python bench/bench_targets.py --tokenizer DIR --examples 10     # the tiny preset, random weights

Greedy decoding gives both sides the same tokens (the tests check it), so their token counts
match; the ratio is ours ÷ reference in tok/s (= reference ÷ ours in ms/example). Rounds
alternate; the final line is the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

FINAL_PREFIX = "ratio (bench checkpoint target tok/s / one-at-a-time mlx_lm generate tok/s): "


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="a local model dir (default: the tiny preset, random weights)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer for the built model (default: MiniMind's from $MLXFLOW_TEST_DATA)")
    p.add_argument("--examples", type=int, default=20, help="questions per suite")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="2 questions per suite, 8 tokens, 1 round (for tests)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.quick:
        args.examples, args.max_tokens, args.rounds = 2, 8, 1
    return args


def one_at_a_time(model, tok, examples, max_tokens: int) -> dict:
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    greedy = make_sampler(temp=0.0)
    tokens, start = 0, time.perf_counter()
    for ex in examples:  # what mlx_lm.generate does, keeping its count of generated tokens
        ids = tok.apply_chat_template([{"role": "user", "content": ex.prompt}], add_generation_prompt=True)
        last = None
        for last in stream_generate(model, tok, ids, max_tokens=max_tokens, sampler=greedy):
            pass
        if last is not None:  # the count includes the end-of-turn token; batch_generate's does not
            tokens += last.generation_tokens - (last.finish_reason == "stop")
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": seconds, "tok_per_s": tokens / seconds, "ms_per_example": 1000 * seconds / len(examples)}


def ours(model_dir: Path, examples, max_tokens: int, batch_size: int) -> dict:
    from mlxcore.bench.report import summarize
    from mlxcore.bench.run import answer
    from mlxcore.config import BenchTarget

    start = time.perf_counter()
    rows = answer(BenchTarget(kind="checkpoint", path=str(model_dir)), examples, max_tokens, batch_size)
    seconds = time.perf_counter() - start  # model loading included
    tokens = sum(r["tokens"] for r in rows)
    return {"tokens": tokens, "seconds": seconds, "tok_per_s": tokens / seconds,
            "ms_per_example": 1000 * seconds / len(examples), "accuracy": summarize(rows)["accuracy"]}


def main(argv=None) -> dict:
    import os

    import mlxcore  # noqa: F401  (fast BLAS first)
    from bench.rollout import build_model
    from mlxcore.bench.suites import SUITES, make
    from mlxcore.models.generate import load_chat

    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-targets-") as tmp:
        model_dir = args.model
        if model_dir is None:
            tok_dir = args.tokenizer or Path(os.environ.get("MLXFLOW_TEST_DATA", "")) / "minimind_tokenizer"
            if not (tok_dir / "tokenizer.json").is_file():
                raise SystemExit(f"no tokenizer at {tok_dir}: pass --tokenizer DIR or set MLXFLOW_TEST_DATA")
            model_dir = build_model(Path(tmp) / "model", tok_dir)
        model, tok = load_chat(model_dir)
        examples = make(SUITES, args.examples)
        ours(model_dir, examples[:2], 4, 2)  # warm-up: compile and allocate once
        one_at_a_time(model, tok, examples[:1], 4)
        rounds = []
        for r in range(args.rounds):
            ref = one_at_a_time(model, tok, examples, args.max_tokens)
            got = ours(model_dir, examples, args.max_tokens, args.batch_size)
            rounds.append({"round": r + 1, "one_at_a_time": ref, "ours": got, "ratio": got["tok_per_s"] / ref["tok_per_s"]})
            print(f"round {r + 1}: one at a time {ref['tok_per_s']:.0f} tok/s, {ref['ms_per_example']:.1f} ms/example "
                  f"({ref['tokens']} tokens); ours {got['tok_per_s']:.0f} tok/s, {got['ms_per_example']:.1f} ms/example "
                  f"({got['tokens']} tokens, accuracy {got['accuracy']:.3f}): {rounds[-1]['ratio']:.2f}x", flush=True)
    result = {"model": str(args.model or "tiny preset (random weights)"), "questions": len(examples),
              "max_tokens": args.max_tokens, "batch_size": args.batch_size, "rounds": rounds,
              "ratio": statistics.median(x["ratio"] for x in rounds)}
    print(f"{FINAL_PREFIX}{result['ratio']:.2f}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
