"""RL rollout throughput: our batched `rollout()` vs one-at-a-time `mlx_lm.generate`, same model,
same prompts, K samples each, in one run.

    python bench/rollout.py                       # tiny preset, 8 GSM8K-style questions x K=8, 128 tokens
    python bench/rollout.py --model DIR --k 8 --prompts 8 --max-tokens 256 --json out.json

Ours: `mlxcore.rl.loop.rollout`, all counted. It runs `mlxcore.rl.sampling.generate_batch`
(every question's K copies in one decode batch, one prefill per question, the fused CPU
sampler, one BLAS thread while generating), then the forward pass that scores the sampled tokens
for the update, the rewards and the fsynced buffer rows. Reference: `mlx_lm.generate`'s loop
(`stream_generate`, which reports the token count) once per sample, with mlx-lm's
`make_sampler` at the same settings. `generate_batch` routes the model's mlx-lm module through
`mlxcore.kernels.patch.use_fast_kernels` (fused SwiGLU), process-wide. From the warm-up on, the
reference's forward uses it too, which does not slow it (in one process, interleaved: 264-281
tok/s with it, 257-267 without).
Tokens/s = generated tokens / wall time; both sides sample at temperature 1 with max_tokens, so
a random model's replies run to about max_tokens on both (the draws differ: the fused sampler
inverts the CDF, mlx-lm uses the Gumbel trick, with the same distribution). Rounds alternate
(timings here vary by about +-15%); the final line is the median of the per-round ratios.
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

FINAL_PREFIX = "ratio (batched rollout tok/s / one-at-a-time mlx_lm.generate tok/s): "


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="a local model dir (default: the tiny preset, random weights)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer for the built model (default: MiniMind's from $MLXFLOW_TEST_DATA)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="2 prompts, K=4, 16 tokens, 1 round (for tests)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.quick:
        args.prompts, args.k, args.max_tokens, args.rounds = 2, 4, 16, 1
    return args


def build_model(out: Path, tokenizer_dir: Path) -> Path:
    from mlxcore.models.checkpoint import save_model_dir
    from mlxcore.config import ModelConfig
    from mlxcore.data import tokenizer as tokenizers
    from mlxcore.models.model import from_config, hf_config

    tok = tokenizers.load(tokenizer_dir)
    config = hf_config(ModelConfig(preset="tiny"), len(tok), tokenizers.special_ids(tok))
    return save_model_dir(out, from_config(config), config, tokenizer_dir=tokenizer_dir)


def questions(n: int):
    from mlxcore.rl.prompts import RLPrompt

    return [RLPrompt(id=f"q{i}", reference={"answer": str(3 * i + 7)}, messages=[{"role": "user", "content":
            f"A shop sells {i + 3} boxes of {i + 2} pens and gives away {i + 1} pens. How many pens are left? "
            "Think step by step and end with '#### <number>'."}]) for i in range(n)]


def one_at_a_time(model, tok, prompts, k: int, max_tokens: int, seed: int) -> dict:
    import mlx.core as mx
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    sampler = make_sampler(temp=1.0, top_p=1.0)
    mx.random.seed(seed)
    tokens, start = 0, time.perf_counter()
    for p in prompts:
        ids = tok.apply_chat_template(p.messages, add_generation_prompt=True)
        for _ in range(k):  # what mlx_lm.generate does, keeping its count of generated tokens
            last = None
            for last in stream_generate(model, tok, ids, max_tokens=max_tokens, sampler=sampler):
                pass
            tokens += last.generation_tokens if last is not None else 0
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": seconds, "tok_per_s": tokens / seconds}


def batched(model, tok, prompts, k: int, max_tokens: int, seed: int, work: Path) -> dict:
    from mlxcore.config import RewardSpec
    from mlxcore.rl.loop import rollout
    from mlxcore.rl.rewards import Scorer

    buf = work / f"buffer-{seed}.jsonl"
    start = time.perf_counter()
    with Scorer([RewardSpec(name="numeric_match")]) as scorer:
        stats = rollout(model, tok, prompts, buf, k=k, max_tokens=max_tokens, scorer=scorer, temperature=1.0,
                        seed=seed, prompts_per_batch=len(prompts))
    seconds = time.perf_counter() - start
    return {"tokens": stats["generated_tokens"], "seconds": seconds, "tok_per_s": stats["generated_tokens"] / seconds,
            "samples": stats["samples"]}


def main(argv=None) -> dict:
    import os

    import mlxcore  # noqa: F401  (fast BLAS first)
    from mlxcore.models.generate import load_chat

    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rollout-bench-") as tmp:
        work = Path(tmp)
        model_dir = args.model
        if model_dir is None:
            tok_dir = args.tokenizer or Path(os.environ.get("MLXFLOW_TEST_DATA", "")) / "minimind_tokenizer"
            if not (tok_dir / "tokenizer.json").is_file():
                raise SystemExit(f"no tokenizer at {tok_dir}: pass --tokenizer DIR or set MLXFLOW_TEST_DATA")
            model_dir = build_model(work / "model", tok_dir)
        model, tok = load_chat(model_dir)
        prompts = questions(args.prompts)
        batched(model, tok, prompts[:1], 2, 4, 0, work)  # warm-up: compile and allocate once
        one_at_a_time(model, tok, prompts[:1], 1, 4, 0)
        rounds = []
        for r in range(args.rounds):
            ref = one_at_a_time(model, tok, prompts, args.k, args.max_tokens, seed=r + 1)
            ours = batched(model, tok, prompts, args.k, args.max_tokens, seed=r + 1, work=work)
            rounds.append({"round": r + 1, "one_at_a_time": ref, "batched": ours, "ratio": ours["tok_per_s"] / ref["tok_per_s"]})
            print(f"round {r + 1}: one at a time {ref['tok_per_s']:.0f} tok/s ({ref['tokens']} tokens, {ref['seconds']:.1f}s); "
                  f"batched {ours['tok_per_s']:.0f} tok/s ({ours['tokens']} tokens, {ours['seconds']:.1f}s): "
                  f"{rounds[-1]['ratio']:.2f}x", flush=True)
    result = {"model": str(args.model or "tiny preset (random weights)"), "prompts": args.prompts, "k": args.k,
              "max_tokens": args.max_tokens, "rounds": rounds,
              "ratio": statistics.median(x["ratio"] for x in rounds)}
    print(f"{FINAL_PREFIX}{result['ratio']:.2f}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
