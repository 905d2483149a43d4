"""Distillation generation throughput vs the teacher server's saturated throughput.

    python bench/distill_throughput.py                     # built model, 4 rounds, about 2 minutes
    python bench/distill_throughput.py --quick             # a smoke run (seconds), for the tests
    python bench/distill_throughput.py --model DIR --prompts 200 --max-tokens 128 --json result.json

Server: a real `python -m mlx_lm.server --model DIR --host 127.0.0.1 --port FREE` subprocess
(log level WARNING, everything else at its defaults: continuous batching, prompt cache), ready
once GET /v1/models answers; requests name the model "default_model". It is always killed at
the end (SIGTERM to this script included). HF_HUB_CACHE points it at an empty folder: its
/v1/models scans the Hugging Face cache and, where that folder is missing, drops the connection
without an answer. --server-blas fast (default) preloads (LD_PRELOAD) the BLAS that mlxcore
picks for MLX's CPU backend (MKL, else OpenBLAS; see mlxcore/perf/_blas.py), as mlxcore's own
processes use; a plain `python -m mlx_lm.server` would run on the wheel's reference BLAS, about
2x slower per token here. `--server-blas reference` leaves it so.

Model: --model DIR, or (default) a small random-weight llama built here with the MiniMind
tokenizer (--tokenizer, default $MLXFLOW_TEST_DATA/minimind_tokenizer). A random model decoded
greedily never emits its end-of-turn token, so every reply would end at max_tokens with
finish_reason "length", which `verify.check` rejects even under verify=False: no rows at all.
The built model therefore answers every prompt with the same --reply-tokens words and then
<|im_end|> (finish_reason "stop"): its attention and MLP output projections are zero, so the
residual stream is the current token's embedding, and its (untied) lm_head maps each token to a
fixed successor (any token outside the reply -> word 1 -> word 2 -> ... -> <|im_end|>). All
other weights are random and every matmul still runs, so a token costs what it costs in a
random model of that shape, and every request generates exactly --reply-tokens tokens.
Defaults: hidden 256, 4 layers, 48-token replies. Requests ask max_tokens = --max-tokens
(default 64, raised to reply_tokens + 16 if that is more, so no reply is cut off).

Prompts: the first --prompts prompts of `PromptConfig(seed=0)`, the same list for both sides,
sampled at temperature 0 (top_p 1), so a prompt costs the same on both sides. Warm-up requests
(2 x the largest concurrency, at that concurrency) use prompts of seed 1, before the first round.

Reference (the "plain concurrent load generator"): C threads, each with its own httpx.Client
(made before the clock starts), take the next prompt index until the list is done and POST
/v1/chat/completions {"model", "messages", "temperature", "top_p", "max_tokens", "stream": false}.
Throughput = requests / wall time from the first request to the last answer. In the first
--sweep-rounds rounds (default 1) it runs at each --concurrency level (default 1,2,4,8); later
rounds run it only at the level with the best requests/s so far (the low levels are far from
saturation and take most of the time). The best requests/s of a round is that round's
"saturated" throughput.

Ours: `generate(TeacherConfig(url, api="openai", model="default_model", temperature=0, top_p=1,
max_tokens, workers=W), PromptConfig(seed=0), fresh rows.jsonl, target_rows=N, policy=every
category verify=False, max_prompts=N)`, with W = the concurrency that saturated the load
generator in the same round (--workers overrides). Rows/s = rows written / wall time of the call
(measured here, around it: making the client, opening the store, fsync per row all count).
With verify=False and unique prompts every reply becomes a row, so rows/s compares with
requests/s; replies that were not kept (duplicate prompt hash, finish_reason "length", empty,
teacher errors) are reported, and a run that falls short of N rows still reports the rows it
wrote.

Rounds: the load generator and ours alternate --rounds times (default 4; this VM's timings vary
by about +-15%, and other work on the machine slows whichever side runs beside it). Reported:
per-round ratios (ours / that round's saturated throughput), their median, and the best-of ratio
(best ours rows/s / best saturated req/s over all rounds), which is the final line's number.
Completion tokens/s of both sides are printed too, to show both did the same work.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run as a plain script from anywhere

MODEL_NAME = "default_model"
FINAL_PREFIX = "ratio (ours rows/s / saturated load-generator req/s): "


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, help="an existing mlx-lm model dir (default: build a small random llama)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer dir for the built model "
                   "(default: $MLXFLOW_TEST_DATA/minimind_tokenizer)")
    p.add_argument("--hidden", type=int, default=256, help="built model: hidden size")
    p.add_argument("--layers", type=int, default=4, help="built model: layers")
    p.add_argument("--reply-tokens", type=int, default=48, help="built model: tokens in every reply")
    p.add_argument("--max-tokens", type=int, help="max_tokens of each request "
                   "(default: 64, or reply_tokens + 16 when that is more)")
    p.add_argument("--prompts", type=int, default=64, help="prompts per measurement (both sides)")
    p.add_argument("--concurrency", default="1,2,4,8", help="load generator's concurrency levels")
    p.add_argument("--workers", type=int, help="our workers (default: the level that saturated the load generator)")
    p.add_argument("--rounds", type=int, default=4, help="alternating rounds of load generator + ours")
    p.add_argument("--sweep-rounds", type=int, default=1,
                   help="rounds whose load generator runs every level (later rounds: the best level so far)")
    p.add_argument("--server-blas", choices=("fast", "reference"), default="fast",
                   help="the server's BLAS: mlxcore's fast one, preloaded, or the mlx wheel's own")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--keep", type=Path, help="keep the work dir (model, rows, server log) here")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run (defaults: 8 prompts, 8-token replies, a 64-wide 2-layer model, levels 1,2, "
                   "one round)")
    if p.parse_known_args(argv)[0].quick:  # new defaults; flags given explicitly still win
        p.set_defaults(prompts=8, reply_tokens=8, hidden=64, layers=2, concurrency="1,2", rounds=1)
    args = p.parse_args(argv)
    try:
        args.levels = sorted({int(x) for x in args.concurrency.split(",") if x.strip()})
    except ValueError:
        p.error(f"--concurrency must be comma-separated integers, got {args.concurrency!r}")
    if not args.levels or min(args.levels) < 1:
        p.error("--concurrency needs levels >= 1")
    if min(args.prompts, args.rounds, args.sweep_rounds, args.hidden, args.layers) < 1 or (
            args.workers is not None and args.workers < 1):
        p.error("--prompts, --rounds, --sweep-rounds, --hidden, --layers and --workers must be >= 1")
    if args.max_tokens is None:
        args.max_tokens = 64 if args.model else max(64, args.reply_tokens + 16)
    if args.model is None:
        if args.tokenizer is None:
            data = os.environ.get("MLXFLOW_TEST_DATA")
            if not data:
                p.error("no tokenizer: pass --tokenizer DIR or --model DIR, or set MLXFLOW_TEST_DATA")
            args.tokenizer = Path(data) / "minimind_tokenizer"
        if not 1 <= args.reply_tokens < args.hidden:
            p.error("--reply-tokens must be >= 1 and < --hidden (one embedding direction per reply word)")
        if args.max_tokens < args.reply_tokens + 2:  # the reply, its end-of-turn token, and a spare
            p.error("--max-tokens must be >= --reply-tokens + 2, or replies are cut off (and rejected)")
    return args


# ---------------------------------------------------------------- the model


def build_model(out: Path, tokenizer_dir: Path, *, hidden: int, layers: int, reply_tokens: int,
                seed: int = 0) -> dict:
    """A random llama whose greedy reply to any prompt is `reply_tokens` fixed words, then EOS."""
    import mlx.core as mx
    import numpy as np
    from transformers import AutoTokenizer

    from mlxcore.models import checkpoint
    from mlxcore.config import ModelConfig
    from mlxcore.models.model import from_config, hf_config

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    eos = tok.eos_token_id
    if eos is None:
        raise ValueError(f"{tokenizer_dir}: the tokenizer has no eos token")
    special = set(tok.all_special_ids)
    words = [i for i in range(len(tok)) if i not in special and re.fullmatch(r" [a-z]{2,}", tok.decode([i]))]
    if len(words) < reply_tokens:
        raise ValueError(f"{tokenizer_dir}: only {len(words)} ' word' tokens, fewer than --reply-tokens {reply_tokens}")
    chain = words[:reply_tokens]
    heads = next(h for h in range(max(1, hidden // 64), 0, -1) if hidden % h == 0)  # head_dim about 64
    cfg = ModelConfig(preset="custom", hidden_size=hidden, num_layers=layers, num_heads=heads,
                      num_kv_heads=max(1, heads // 2), intermediate_size=3 * hidden, tie_embeddings=False,
                      max_position_embeddings=4096)
    config = hf_config(cfg, len(tok), {"bos": tok.bos_token_id, "eos": eos, "pad": tok.pad_token_id})
    model = from_config(config, seed=seed)

    rng = np.random.default_rng(seed)
    vocab = len(tok)
    # Direction 0: "not a reply word"; direction k + 1: reply word k.
    emb = rng.normal(0, 0.02, (vocab, hidden)).astype(np.float32)
    emb[:, 0] += 1.0
    for k, t in enumerate(chain):
        emb[t, 0] -= 1.0
        emb[t, k + 1] += 1.0
    head = rng.normal(0, 0.02, (vocab, hidden)).astype(np.float32)
    head[chain[0], 0] += 1.0                      # anything else -> word 0
    for k in range(1, reply_tokens):
        head[chain[k], k] += 1.0                  # word k-1 -> word k
    head[eos, reply_tokens] += 1.0                # last word -> end of turn
    updates = {"model": {"embed_tokens": {"weight": mx.array(emb)},
                         "layers": [{"self_attn": {"o_proj": {"weight": mx.zeros_like(layer.self_attn.o_proj.weight)}},
                                     "mlp": {"down_proj": {"weight": mx.zeros_like(layer.mlp.down_proj.weight)}}}
                                    for layer in model.model.layers]},
               "lm_head": {"weight": mx.array(head)}}
    model.update(updates)
    mx.eval(model.parameters())
    checkpoint.save_model_dir(out, model, config, tokenizer_dir=tokenizer_dir)
    return {"hidden": hidden, "layers": layers, "heads": heads, "vocab": vocab, "reply_tokens": reply_tokens,
            "reply": tok.decode(chain), "tokenizer": str(tokenizer_dir)}


# ---------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m mlx_lm.server` on a free loopback port; a context manager that always kills it."""

    def __init__(self, model: Path, work: Path, blas: str = "fast") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = work / "server.log"
        hub = work / "hf-hub"
        hub.mkdir(exist_ok=True)
        env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
        self.blas = "reference (mlx wheel)"
        if blas == "fast":
            import mlxcore

            if mlxcore.BLAS.path and mlxcore.BLAS.name in ("mkl", "openblas", "custom"):
                env["LD_PRELOAD"] = " ".join(filter(None, [mlxcore.BLAS.path, env.get("LD_PRELOAD")]))
                self.blas = f"{mlxcore.BLAS.name} ({mlxcore.BLAS.path}, LD_PRELOAD)"
        self.cmd = [sys.executable, "-m", "mlx_lm.server", "--model", str(model), "--host", "127.0.0.1",
                    "--port", str(self.port), "--log-level", "WARNING"]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 180.0) -> float:
        import httpx

        start = time.monotonic()
        with httpx.Client(base_url=self.url, timeout=5, trust_env=False) as c:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"mlx_lm.server exited with {self.proc.returncode}:\n{self.log_tail()}")
                try:
                    if c.get("/v1/models").status_code == 200:
                        return time.monotonic() - start
                except httpx.HTTPError:
                    pass
                if time.monotonic() - start > timeout:
                    raise RuntimeError(f"mlx_lm.server not ready after {timeout:.0f}s:\n{self.log_tail()}")
                time.sleep(0.2)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------- the two sides


def request_body(messages: list[dict], max_tokens: int) -> dict:
    return {"model": MODEL_NAME, "messages": messages, "temperature": 0.0, "top_p": 1.0,
            "max_tokens": max_tokens, "stream": False}


def load_generator(url: str, bodies: list[dict], concurrency: int) -> dict:
    """POST every body, `concurrency` at a time; requests/s over the whole list."""
    import httpx

    n = len(bodies)
    results: list[tuple | None] = [None] * n
    errors: list[str] = []
    counter = itertools.count()  # next() on it is atomic under the GIL
    clients = [httpx.Client(base_url=url, timeout=600, trust_env=False) for _ in range(concurrency)]

    def worker(client) -> None:
        while (i := next(counter)) < n:
            try:
                resp = client.post("/v1/chat/completions", json=bodies[i])
                resp.raise_for_status()
                data = resp.json()
                usage = data.get("usage") or {}
                results[i] = (usage.get("completion_tokens", 0), data["choices"][0].get("finish_reason"))
            except Exception as e:  # noqa: BLE001 - counted and reported
                errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in clients]
    try:
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - start
    finally:
        for c in clients:
            c.close()
    done = [r for r in results if r is not None]
    tokens = sum(r[0] for r in done)
    return {"concurrency": concurrency, "requests": len(done), "errors": len(errors), "error_sample": errors[:3],
            "seconds": seconds, "req_per_s": len(done) / seconds, "completion_tokens": tokens,
            "tok_per_s": tokens / seconds, "finish": dict(Counter(r[1] for r in done))}


def ours(url: str, n: int, max_tokens: int, workers: int, out: Path) -> dict:
    from mlxcore.distill.generate import GenerationStalled, generate
    from mlxcore.distill.prompts import PromptConfig
    from mlxcore.data.rows import iter_rows
    from mlxcore.clients.chat import TeacherConfig
    from mlxcore.distill.verify import CategoryPolicy, VerifyPolicy

    policy = VerifyPolicy(**{c: CategoryPolicy(verify=False) for c in ("math", "logic", "reasoning", "knowledge")})
    teacher = TeacherConfig(url=url, api="openai", model=MODEL_NAME, temperature=0, top_p=1,
                            max_tokens=max_tokens, workers=workers)
    stalled = None
    start = time.perf_counter()
    try:
        stats = generate(teacher, PromptConfig(seed=0), out, target_rows=n, policy=policy, max_prompts=n)
    except GenerationStalled as e:
        stats, stalled = None, str(e)
    seconds = time.perf_counter() - start
    rows = sum(1 for _ in iter_rows(out)) if out.exists() else 0
    res = {"workers": workers, "rows": rows, "seconds": seconds, "rows_per_s": rows / seconds, "stalled": stalled}
    if stats is not None:
        t = stats["teacher"]
        res.update(generate_elapsed_s=stats["elapsed_s"], generate_rows_per_s=stats["rows_per_s"],
                   requests=t.get("ok"), teacher_errors=stats["teacher_errors"],
                   completion_tokens=t.get("completion_tokens"), rejections=stats["rejections"],
                   tok_per_s=(t.get("completion_tokens") or 0) / seconds)
    return res


# ---------------------------------------------------------------- the run


def main(argv=None) -> dict:
    args = parse_args(argv)
    from mlxcore.distill.prompts import PromptConfig, prompt
    from mlxcore.data.rows import prompt_hash

    work = Path(tempfile.mkdtemp(prefix="distill-bench-"))
    try:
        if args.model is not None:
            model_dir, model_info = args.model, {"dir": str(args.model)}
        else:
            model_dir = work / "model"
            t = time.perf_counter()
            model_info = build_model(model_dir, args.tokenizer, hidden=args.hidden, layers=args.layers,
                                     reply_tokens=args.reply_tokens)
            model_info["build_s"] = time.perf_counter() - t
        prompts = [prompt(PromptConfig(seed=0), i) for i in range(args.prompts)]
        unique = len({prompt_hash(p.messages) for p in prompts})
        bodies = [request_body(p.messages, args.max_tokens) for p in prompts]
        warm = [request_body(prompt(PromptConfig(seed=1), i).messages, args.max_tokens)
                for i in range(2 * max(args.levels))]

        what = (f"built llama h={args.hidden} L={args.layers}, {args.reply_tokens}-token replies"
                if args.model is None else str(args.model))
        print(f"model: {what}; {args.prompts} prompts ({unique} unique), max_tokens {args.max_tokens}, "
              f"levels {args.levels}, {args.rounds} round(s)", flush=True)
        if unique < args.prompts:
            print(f"note: {args.prompts - unique} prompts repeat an earlier one's hash: ours keeps one row per "
                  "prompt hash, so at most {unique} rows", flush=True)
        rounds = []
        with Server(model_dir, work, args.server_blas) as server:
            ready_s = server.wait_ready()
            warmup = load_generator(server.url, warm, max(args.levels))
            if warmup["errors"]:
                raise RuntimeError(f"warm-up requests failed: {warmup['error_sample']}\n{server.log_tail()}")
            server_blas = server.blas
            server_pid = server.proc.pid
            print(f"server pid {server_pid} (BLAS: {server.blas}) ready in {ready_s:.1f}s; "
                  f"warm-up {warmup['requests']} requests in {warmup['seconds']:.1f}s", flush=True)
            best_by_level: dict[int, float] = {}
            for r in range(args.rounds):
                sweep = []
                # The first --sweep-rounds rounds try every level; later ones only the best level so far.
                levels = args.levels if r < args.sweep_rounds else [max(best_by_level, key=best_by_level.get)]
                for c in levels:
                    res = load_generator(server.url, bodies, c)
                    sweep.append(res)
                    best_by_level[c] = max(best_by_level.get(c, 0.0), res["req_per_s"])
                    print(f"  round {r + 1} load generator c={c}: {res['req_per_s']:.2f} req/s "
                          f"({res['seconds']:.1f}s, {res['errors']} errors)", flush=True)
                sat = max(sweep, key=lambda x: x["req_per_s"])
                w = args.workers or sat["concurrency"]
                mine = ours(server.url, args.prompts, args.max_tokens, w, work / f"round{r + 1}" / "rows.jsonl")
                print(f"  round {r + 1} ours workers={w}: {mine['rows_per_s']:.2f} rows/s "
                      f"({mine['rows']} rows, {mine['seconds']:.1f}s)", flush=True)
                rounds.append({"round": r + 1, "load_generator": sweep, "saturated": sat, "ours": mine,
                               "ratio": mine["rows_per_s"] / sat["req_per_s"]})
            server_alive = server.proc.poll() is None
            log_tail = server.log_tail(2000)
    finally:
        if args.keep is not None:
            shutil.copytree(work, args.keep, dirs_exist_ok=True)
        shutil.rmtree(work, ignore_errors=True)

    best_sat = max((x["saturated"] for x in rounds), key=lambda x: x["req_per_s"])
    best_ours = max((x["ours"] for x in rounds), key=lambda x: x["rows_per_s"])
    result = {
        "model": model_info, "server_pid": server_pid, "server_blas": server_blas,
        "prompts": args.prompts, "unique_prompts": unique, "max_tokens": args.max_tokens,
        "levels": args.levels, "rounds": rounds,
        "saturated_req_per_s": best_sat["req_per_s"], "saturated_concurrency": best_sat["concurrency"],
        "ours_rows_per_s": best_ours["rows_per_s"], "ours_workers": best_ours["workers"],
        "ratio": best_ours["rows_per_s"] / best_sat["req_per_s"],
        "round_ratios": [x["ratio"] for x in rounds],
        "median_round_ratio": statistics.median(x["ratio"] for x in rounds),
        "dropped_rows": [args.prompts - x["ours"]["rows"] for x in rounds],
        "server_alive_at_end": server_alive,
    }
    if not server_alive:
        result["server_log_tail"] = log_tail
    print_table(result)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


def print_table(res: dict) -> None:
    levels = res["levels"]
    head = ["round"] + [f"c={c} req/s" for c in levels] + ["saturated", "ours W", "ours rows/s", "rows", "ratio"]
    rows = []
    for x in res["rounds"]:
        by_c = {s["concurrency"]: f"{s['req_per_s']:.2f}" for s in x["load_generator"]}
        o = x["ours"]
        rows.append([str(x["round"])] + [by_c.get(c, "-") for c in levels]
                    + [f"{x['saturated']['req_per_s']:.2f} (c={x['saturated']['concurrency']})", str(o["workers"]),
                       f"{o['rows_per_s']:.2f}", f"{o['rows']}/{res['prompts']}", f"{x['ratio']:.3f}"])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    print()
    print("  ".join(h.rjust(w) for h, w in zip(head, widths)))
    for r in rows:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths)))
    print()
    for x in res["rounds"]:
        sat, o = x["saturated"], x["ours"]
        tok = f"{o['tok_per_s']:.0f}" if o.get("tok_per_s") is not None else "?"
        print(f"round {x['round']}: completion tokens/s: load generator {sat['tok_per_s']:.0f} "
              f"({sat['completion_tokens']} tokens, finish {sat['finish']}), ours {tok} "
              f"({o.get('completion_tokens')} tokens)")
        if o["rows"] < res["prompts"]:
            print(f"round {x['round']}: ours kept {o['rows']} of {res['prompts']} replies"
                  + (f" (rejections {o.get('rejections')}, teacher errors {o.get('teacher_errors')})"
                     if o.get("rejections") is not None else "")
                  + (f"; {o['stalled']}" if o["stalled"] else ""))
    if not res["server_alive_at_end"]:
        print("warning: the server had exited before the end:\n" + res.get("server_log_tail", ""))
    print(f"per-round ratios: {', '.join(f'{r:.3f}' for r in res['round_ratios'])}  "
          f"(median {res['median_round_ratio']:.3f})")
    print(f"best: ours {res['ours_rows_per_s']:.2f} rows/s (workers {res['ours_workers']}), saturated load "
          f"generator {res['saturated_req_per_s']:.2f} req/s (c={res['saturated_concurrency']})")
    print(f"{FINAL_PREFIX}{res['ratio']:.3f}")


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through the finally blocks: the server is killed


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    main()
