"""Power Retention vs LLaMA (equal shapes, so equal parameter counts to within the gate): held-out loss at
equal tokens on tinyshakespeare, decode memory and tok/s at long context, training tok/s at seq 4096.

    python bench/retention.py                 # the README's run (about half an hour on 2 busy cores)
    python bench/retention.py --quick         # a seconds-to-a-minute check (tiny model, short contexts)
    python bench/retention.py --json r.json   # also write the numbers

Data: $MLXFLOW_TEST_DATA/tinyshakespeare/input.txt (or --text), characters as tokens (the first 90% to
train on, the last 10% held out). Models: `mlxcore.models.model.from_config(hf_config(ModelConfig))`
with the same shapes and seed for both sides; arch=retention differs only in its attention (degree p,
chunk, gating; q/k norms and a per-head gate add < 1% parameters, the counts are printed).

(a) loss: both sides train with AdamW (warmup + cosine) on the same batches, steps interleaved so load
    from other processes falls on both alike; held-out loss over the same fixed windows, before and
    after the same number of tokens.
(b) decode: for each context length, a prompt of that many tokens is prefilled through the model's own
    cache (llama: mlx-lm's KVCache, prefill in steps of 1024; retention: its RetentionCache, prefill by
    the chunked form), then --decode tokens are generated one at a time (greedy). Reported: the cache's
    bytes after decoding, the peak memory during decode (mx.get_peak_memory after mx.reset_peak_memory,
    weights included), and decode tok/s.
(c) train tok/s: forward + backward + AdamW update at --train-seq (batch 1), median over steps.

Timings are wall-clock on whatever this machine is doing: indicative, not precise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import mlxcore  # noqa: E402  first: it loads a fast BLAS before mlx.core binds one
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_map  # noqa: E402

from mlxcore.config import ModelConfig  # noqa: E402
from mlxcore.models.model import from_config, hf_config, num_params  # noqa: E402


def load_text(path: str | None) -> str:
    if path is None:
        root = Path(os.environ.get("MLXFLOW_TEST_DATA", REPO / "tests/data"))
        found = sorted(root.glob("tinyshakespeare*/input.txt")) + sorted(root.glob("tinyshakespeare*.txt"))
        if not found:
            sys.exit(f"no tinyshakespeare under {root}: set MLXFLOW_TEST_DATA or pass --text")
        path = str(found[0])
    return Path(path).read_text()


def build(arch: str, args, vocab: int):
    cfg = ModelConfig(preset="custom", arch=arch, hidden_size=args.hidden, num_layers=args.layers,
                      num_heads=args.heads, num_kv_heads=args.heads, head_dim=args.head_dim,
                      intermediate_size=args.intermediate, retention_chunk=args.chunk,
                      retention_degree=args.degree, max_position_embeddings=max(args.contexts) + args.decode + 8)
    return from_config(hf_config(cfg, vocab), seed=args.seed)


def loss_fn(model, x):
    logits = model(x[:, :-1])
    return nn.losses.cross_entropy(logits, x[:, 1:]).mean()


def held_out(model, windows) -> float:
    return float(np.mean([loss_fn(model, w).item() for w in windows]))


def train_compare(args, ids: np.ndarray, vocab: int) -> dict:
    split = int(0.9 * len(ids))
    train, val = ids[:split], ids[split:]
    rng = np.random.default_rng(args.seed)
    L = args.seq + 1
    val_starts = np.linspace(0, len(val) - L - 1, args.val_windows).astype(int)
    windows = [mx.array(np.stack([val[s: s + L] for s in val_starts[i: i + args.batch]]))
               for i in range(0, len(val_starts), args.batch)]
    steps = max(1, args.tokens // (args.batch * args.seq))
    sides = {}
    for arch in ("llama", "retention"):
        model = build(arch, args, vocab)
        sched = optim.join_schedules([optim.linear_schedule(0.0, args.lr, max(1, steps // 10)),
                                      optim.cosine_decay(args.lr, steps, args.lr * 0.1)], [max(1, steps // 10)])
        opt = optim.AdamW(learning_rate=sched, weight_decay=0.01)
        sides[arch] = dict(model=model, opt=opt, vg=nn.value_and_grad(model, loss_fn), before=held_out(model, windows),
                           params=num_params(model), seconds=0.0)
    for step in range(steps):
        starts = rng.integers(0, len(train) - L, args.batch)
        x = mx.array(np.stack([train[s: s + L] for s in starts]))
        for arch in (("llama", "retention") if step % 2 == 0 else ("retention", "llama")):
            s = sides[arch]
            t0 = time.perf_counter()
            loss, grads = s["vg"](s["model"], x)
            grads, _ = optim.clip_grad_norm(grads, 1.0)
            s["opt"].update(s["model"], grads)
            mx.eval(s["model"].parameters(), s["opt"].state, loss)
            s["seconds"] += time.perf_counter() - t0
        if args.verbose and (step % max(1, steps // 10) == 0 or step == steps - 1):
            print(f"  step {step + 1}/{steps}", flush=True)
    out = {}
    for arch, s in sides.items():
        out[arch] = {"params": s["params"], "tokens": steps * args.batch * args.seq, "steps": steps,
                     "val_loss_before": s["before"], "val_loss_after": held_out(s["model"], windows),
                     "train_tok_per_s": steps * args.batch * args.seq / s["seconds"]}
        s.pop("model")
    return out


def decode_compare(args, vocab: int) -> dict:
    from mlx_lm.models.cache import make_prompt_cache

    out = {}
    rng = np.random.default_rng(1)
    for arch in ("llama", "retention"):
        model = build(arch, args, vocab)
        model.eval()
        rows = {}
        for ctx in args.contexts:
            prompt = mx.array(rng.integers(0, vocab, (1, ctx)))
            cache = make_prompt_cache(model)
            for lo in range(0, ctx, args.prefill_step):
                model(prompt[:, lo: lo + args.prefill_step], cache=cache)
                mx.eval([c.state for c in cache])
            mx.clear_cache()
            mx.reset_peak_memory()
            token = mx.array([[1]])
            t0 = time.perf_counter()
            for _ in range(args.decode):
                token = mx.argmax(model(token, cache=cache)[:, -1:], axis=-1)
                mx.eval(token, [c.state for c in cache])
            seconds = time.perf_counter() - t0
            rows[ctx] = {"cache_bytes": sum(c.nbytes for c in cache), "peak_bytes": mx.get_peak_memory(),
                         "tok_per_s": args.decode / seconds}
            del cache
            mx.clear_cache()
        out[arch] = rows
    return out


def train_speed(args, vocab: int) -> dict:
    out = {}
    x = mx.array(np.random.default_rng(2).integers(0, vocab, (1, args.train_seq + 1)))
    for arch in ("llama", "retention"):
        model = build(arch, args, vocab)
        opt = optim.AdamW(learning_rate=1e-4)
        vg = nn.value_and_grad(model, loss_fn)
        times = []
        for i in range(args.speed_steps + 1):
            t0 = time.perf_counter()
            loss, grads = vg(model, x)
            opt.update(model, grads)
            mx.eval(model.parameters(), opt.state, loss)
            if i:  # the first step builds the graph
                times.append(time.perf_counter() - t0)
        out[arch] = {"tok_per_s": args.train_seq / statistics.median(times)}
        del model, opt
        mx.clear_cache()
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a tiny model, short contexts, few tokens")
    ap.add_argument("--text", help="training text (default: $MLXFLOW_TEST_DATA/tinyshakespeare/input.txt)")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--intermediate", type=int, default=352)
    ap.add_argument("--degree", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--seq", type=int, default=256, help="(a) training sequence length")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=100_000, help="(a) training tokens per side")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--val-windows", type=int, default=32)
    ap.add_argument("--contexts", default="1024,4096,16384", help="(b) context lengths")
    ap.add_argument("--decode", type=int, default=16, help="(b) tokens decoded per context")
    ap.add_argument("--prefill-step", type=int, default=1024)
    ap.add_argument("--train-seq", type=int, default=4096, help="(c) sequence length of the speed run")
    ap.add_argument("--speed-steps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.heads, args.head_dim, args.intermediate = 64, 2, 4, 16, 128
        args.seq, args.batch, args.tokens, args.val_windows, args.chunk = 64, 4, 2_048, 4, 32
        args.contexts, args.decode, args.train_seq, args.speed_steps = "256,1024", 4, 512, 2
    args.contexts = [int(c) for c in str(args.contexts).split(",")]

    text = load_text(args.text)
    chars = sorted(set(text))
    lut = {c: i for i, c in enumerate(chars)}
    ids = np.fromiter((lut[c] for c in text), dtype=np.int32, count=len(text))
    vocab = len(chars)
    print(f"data: {len(ids):,} characters, vocab {vocab}; model hidden {args.hidden} x {args.layers} layers, "
          f"{args.heads} heads of {args.head_dim}, retention p={args.degree} chunk {args.chunk}", flush=True)

    results = {"args": {k: v for k, v in vars(args).items() if k not in ("json", "text")}}
    results["loss"] = loss = train_compare(args, ids, vocab)
    print(f"\n(a) held-out loss at equal tokens ({loss['llama']['tokens']:,} tokens, seq {args.seq})")
    for arch, r in loss.items():
        print(f"  {arch:9s} params {r['params']:>10,}  loss {r['val_loss_before']:.4f} -> {r['val_loss_after']:.4f}"
              f"  train {r['train_tok_per_s']:,.0f} tok/s")
    print(f"  loss ratio (retention / llama): {loss['retention']['val_loss_after'] / loss['llama']['val_loss_after']:.3f}")

    results["decode"] = dec = decode_compare(args, vocab)
    print("\n(b) decode after a prompt of the given context (greedy, batch 1)")
    print(f"  {'context':>8s} {'arch':9s} {'cache MiB':>10s} {'peak MiB':>9s} {'tok/s':>8s}")
    for ctx in args.contexts:
        for arch in ("llama", "retention"):
            r = dec[arch][ctx]
            print(f"  {ctx:>8d} {arch:9s} {r['cache_bytes'] / 2**20:>10.2f} {r['peak_bytes'] / 2**20:>9.1f} "
                  f"{r['tok_per_s']:>8.1f}")
    lo, hi = args.contexts[0], args.contexts[-1]
    for arch in ("llama", "retention"):
        print(f"  {arch} peak decode memory at {hi} / at {lo}: {dec[arch][hi]['peak_bytes'] / dec[arch][lo]['peak_bytes']:.3f}"
              f"   cache bytes ratio: {dec[arch][hi]['cache_bytes'] / dec[arch][lo]['cache_bytes']:.3f}")

    results["train_speed"] = sp = train_speed(args, vocab)
    print(f"\n(c) training tok/s at seq {args.train_seq} (batch 1): llama {sp['llama']['tok_per_s']:,.0f}, "
          f"retention {sp['retention']['tok_per_s']:,.0f}")
    print(f"  ratio (retention / llama): {sp['retention']['tok_per_s'] / sp['llama']['tok_per_s']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
