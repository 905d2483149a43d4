"""SFT training step: mlxcore's vs mlx-lm's trainer (`mlx_lm.lora --fine-tune-type full`) vs mlx-lm-lora's, in one run.

    python bench/sft_vs_mlx_lm.py --blas-threads 1               # tiny preset, 8 GSM8K rows x 257 tokens
    python bench/sft_vs_mlx_lm.py --preset 200mb --batch 4 --warmup 1 --rounds 3 --steps 1 --blas-threads 1
    python bench/sft_vs_mlx_lm.py --smoke                        # seconds: a 2-layer model, 2 steps a side
    python bench/sft_vs_mlx_lm.py --trainable layers             # what the mlx_lm.lora CLI trains (below)

Every side loads one HF-layout model dir (config.json + model.safetensors of a fresh --preset model,
in a temporary dir): ours with `mlxcore.models.model.load`, theirs with `mlx_lm.utils.load_model`.
One fixed batch of --batch chat rows of exactly --seq + 1 tokens: the first GSM8K train rows that
long (question -> answer, the MiniMind tokenizer's chat template, tokenized as `mlxcore.data.
pretokenize` does with `chat_segments`; $MLXFLOW_TEST_DATA or --gsm8k / --tokenizer), cut there;
without the data, random tokens with a quarter of each row as the prompt. The loss is on the answer
only: each row's mask is the prompt's zeros then ones to its end, so mlx-lm's (offset, length) mask
and ours cover the same targets, and no row is padded (mlx-lm's mask would also count the target
after a shorter row's last token). tok/s counts those trained tokens; the script checks that the
counts mlx-lm's and mlx-lm-lora's trainers report equal ours.

Sides (--sides): ours: the step `fit()` builds, `make_step(model, AdamW, grad_clip, compile,
losses.from_config(cfg), fused=cfg.fused_optimizer)` (mlxcore's fused CPU attention / SwiGLU /
cross-entropy) on `collate_sft`'s batch. mlx-lm: `mlx_lm.tuner.trainer.train(model, AdamW, dataset,
args=TrainingArgs(...))` unchanged, its own `iterate_batches`, `default_loss` and compiled step (what
`mlx_lm.lora` runs). mlx-lm-lora: `mlx_lm_lora.trainer.sft_trainer.train_sft(..., SFTTrainingArgs(
loss_type="nll"))`, unchanged but for the Metal-only device_info key it reads (dpo_vs_mlx_lm_lora.py).
Theirs use mlx-lm's own attention / SwiGLU (--their-kernels mlxcore: ours). All float32, AdamW(lr)
with MLX's defaults (betas 0.9/0.999, weight decay 0.01: what `mlx_lm.lora` builds), no clipping
(mlx-lm clips none; --grad-clip sets ours). --trainable all (default) trains every parameter on every
side; `mlx_lm.lora --fine-tune-type full` unfreezes `model.layers` only (embeddings and final norm
stay frozen): --trainable layers does that on every side.

Interleaving: each of their trainers runs one whole `train()` call in its own thread, and the batch
iterator handed to it (theirs, wrapped) waits for the side's turn before each step, outside the
trainer's clock: one side computes at a time. After --warmup steps each, --rounds rounds of --steps
steps a side (order rotating), so load changes on a shared machine fall on all sides alike. Step
time: ours `perf_counter` around step + `mx.eval`; theirs what their trainer reports per step
(`steps_per_report=1`). Reported: median step ms, tok/s = trained tokens / median, peak memory = the
side's weights + optimizer state + the most `mx.get_peak_memory()` rose over the memory in use during
its turns, the first step's loss (same weights and batch: must agree) and the last. MKL (loaded by
`mlxcore`) serves every side; use --blas-threads 1 on a shared machine (see dpo_vs_mlx_lm_lora.py).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import mlxcore  # noqa: E402  first: it loads a fast BLAS (MKL) before mlx.core binds one
import mlx.core as mx  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from bench.dpo_vs_mlx_lm_lora import blas_threads, metal_working_set_key, mlx_lm_lora_version  # noqa: E402
from mlxcore.config import ModelConfig, TrainConfig  # noqa: E402
from mlxcore.data.loader import collate_sft  # noqa: E402
from mlxcore.kernels.patch import restore_all, use_fast_kernels  # noqa: E402
from mlxcore.models.model import from_config, hf_config, load, num_params, save_weights  # noqa: E402
from mlxcore.train import losses  # noqa: E402
from mlxcore.train.step import make_step  # noqa: E402

FINAL_PREFIX = "ratio ours/"
SIDES = ("ours", "mlx-lm", "mlx-lm-lora")
LOSS_ATOL = 1e-4
MIB = 1 << 20


def parse_args(argv=None) -> argparse.Namespace:
    data = os.environ.get("MLXFLOW_TEST_DATA")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=["tiny", "200mb"], default="tiny")
    p.add_argument("--smoke", action="store_true", help="a 2-layer hidden-64 model, batch 2 x seq 128, 1 warmup + 1 round of 2 steps")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256, help="inputs per row (rows are seq + 1 tokens)")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--grad-clip", type=float, default=0.0, help="ours only (mlx-lm clips none); 0: off")
    p.add_argument("--sparse-loss", action="store_true", help="ours: logits at trained tokens only (TrainConfig.sparse_loss)")
    p.add_argument("--trainable", choices=["all", "layers"], default="all",
                   help="layers: model.layers only, as mlx_lm.lora --fine-tune-type full trains (every side)")
    p.add_argument("--sides", default=",".join(SIDES), help="comma-separated, ours first: " + ", ".join(SIDES))
    p.add_argument("--their-kernels", choices=["mlx-lm", "mlxcore"], default="mlx-lm")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps a side first (compilation)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="timed steps a side per round")
    p.add_argument("--profile", type=int, default=0, help="then N steps of ours phase by phase (Stepper profile=True)")
    p.add_argument("--gsm8k", type=Path, default=Path(data) / "gsm8k" if data else None)
    p.add_argument("--tokenizer", type=Path, default=Path(data) / "minimind_tokenizer" if data else None)
    p.add_argument("--synthetic", action="store_true", help="random tokens even when GSM8K is there")
    p.add_argument("--vocab", type=int, default=6400, help="synthetic rows only (else the tokenizer's)")
    p.add_argument("--blas-threads", type=int, help="MKL threads for every side (default: MKL's, one per core)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    if args.smoke:
        args.batch, args.seq, args.warmup, args.rounds, args.steps = 2, 128, 1, 1, 2
    args.sides = args.sides.split(",")
    if args.sides[0] != "ours" or len(args.sides) < 2 or not set(args.sides) <= set(SIDES) or len(set(args.sides)) < len(args.sides):
        p.error("--sides: ours, then one or both of mlx-lm, mlx-lm-lora")
    if min(args.batch, args.seq - 3, args.rounds, args.steps) < 1 or args.warmup < 0:
        p.error("--batch, --rounds, --steps must be >= 1, --seq >= 4, --warmup >= 0")
    return args


# ------------------------------------------------------------------------------- model and data

def model_config(args, vocab: int, special: dict) -> dict:
    if args.smoke:
        cfg = ModelConfig(preset="custom", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)
    else:
        cfg = ModelConfig(preset=args.preset)
    return hf_config(cfg, vocab, special)


def write_model_dir(config: dict, seed: int, out: Path) -> Path:
    """A Hugging Face-layout model dir (config.json + model.safetensors) of a fresh model."""
    out.mkdir(parents=True)
    save_weights(from_config(config, seed=seed), out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def gsm8k_rows(args, length: int) -> tuple[list, int, dict]:
    """([(tokens, mask)] x batch, vocab, special ids): the first GSM8K train rows of >= `length`
    tokens whose answer runs past `length`, cut there (mask: the prompt's zeros, then ones)."""
    from mlxcore.data import tokenizer as tokenizers
    from mlxcore.data.pretokenize import chat_segments

    tok = tokenizers.load(args.tokenizer)
    rows = []
    with open(args.gsm8k / "train.jsonl") as f:
        for line in f:
            ex = json.loads(line)
            segs = chat_segments(tok, [{"role": "user", "content": ex["question"]},
                                       {"role": "assistant", "content": ex["answer"]}])
            ids, mask = [], []
            for text, train in segs:
                piece = tok.encode(text, add_special_tokens=False)
                ids += piece
                mask += [int(train)] * len(piece)
            m = np.array(mask[:length], np.float32)
            prompt = int(np.argmax(m > 0))
            if len(ids) >= length and m[0] == 0 and m.any() and m[prompt:].all():
                rows.append((np.array(ids[:length], np.int32), m))
            if len(rows) == args.batch:
                return rows, len(tok), tokenizers.special_ids(tok)
    raise SystemExit(f"sft_vs_mlx_lm: only {len(rows)} GSM8K rows of {length}+ tokens; lower --seq or --batch")


def synthetic_rows(args, length: int) -> list:
    rng = np.random.default_rng(args.seed)
    mask = np.ones(length, np.float32)
    mask[: max(1, length // 4)] = 0
    return [(rng.integers(3, args.vocab, length).astype(np.int32), mask.copy()) for _ in range(args.batch)]


# ------------------------------------------------------------------------------------- sides

class Side:
    """One side's model, optimizer, step times, losses and memory; `turn(n)` runs n of its steps."""

    def __init__(self, name: str, model, optimizer):
        self.name, self.model, self.optimizer = name, model, optimizer
        self.times, self.losses, self.tokens, self.transient = [], [], [], 0

    def resident(self) -> int:
        trees = tree_flatten(self.model.parameters()) + tree_flatten(self.optimizer.state)
        return sum(v.nbytes for _, v in trees if isinstance(v, mx.array))

    def measured_turn(self, n: int, kernels) -> None:
        kernels()
        before = mx.get_active_memory()
        mx.reset_peak_memory()
        self.turn(n)
        self.transient = max(self.transient, mx.get_peak_memory() - before)


class Ours(Side):
    def __init__(self, model_dir: Path, rows: list, args):
        model, self.config = load(model_dir)
        set_trainable(model, args.trainable)
        super().__init__("ours", model, optim.AdamW(args.lr))
        self.cfg = TrainConfig(lr=args.lr, grad_clip=args.grad_clip, sparse_loss=args.sparse_loss,
                               batch_size=args.batch, seq_len=args.seq)
        self.loss = losses.from_config(self.cfg)
        self.batch = collate_sft(rows, self.cfg.seq_len, self.cfg.pad_multiple, 0)
        self.step, self.state = self._make_step(self.cfg.profile_timing)

    def _make_step(self, profile: bool):
        cfg = self.cfg  # as fit() calls it
        return make_step(self.model, self.optimizer, cfg.grad_clip, cfg.compile, self.loss, None, profile,
                         router_aux_loss_coef=self.config.get("router_aux_loss_coef", 0.0), fused=cfg.fused_optimizer)

    def turn(self, n: int) -> None:
        for _ in range(n):
            t0 = time.perf_counter()
            loss_sum, count, norm = self.step([self.batch])
            mx.eval(self.state, loss_sum, count, norm, self.step.aux)
            self.times.append(time.perf_counter() - t0)
            self.losses.append(loss_sum.item() / count.item())
            self.tokens.append(int(count.item()))

    def profile(self, n: int) -> dict:
        step, state = self._make_step(True)
        totals = {}
        for i in range(n + 1):  # the first compiles the phases
            t0 = time.perf_counter()
            out = step([self.batch])
            mx.eval(state, *out)
            wall = 1e3 * (time.perf_counter() - t0)
            if i:
                for k, v in {**step.timings, "step": wall}.items():
                    totals[k] = totals.get(k, 0.0) + v / n
        return totals


class Theirs(Side):
    """A trainer's whole `train()` call in a thread; its batch iterator waits for each step's turn."""

    def __init__(self, name: str, model_dir: Path, rows: list, args, log: io.StringIO):
        from mlx_lm.utils import load_model

        model, _ = load_model(model_dir)
        set_trainable(model, args.trainable)
        super().__init__(name, model, optim.AdamW(args.lr))
        self.prompt_lens = [int(np.argmax(m > 0)) for _, m in rows]
        self.dataset = [(t.tolist(), p) for (t, _), p in zip(rows, self.prompt_lens)]  # (tokens, offset)
        self.args, self.log, self.reports, self.error, self.left = args, log, [], None, 0
        self.go, self.done = threading.Semaphore(0), threading.Semaphore(0)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self._wait_done()  # built and at its first step

    def _wait_done(self):
        self.done.acquire()
        if self.error is not None:
            print(self.log.getvalue()[-3000:], file=sys.stderr)
            raise RuntimeError(f"{self.name} failed") from self.error

    def _my_turn(self):  # in the trainer's thread, before each step
        if self.left == 0:
            self.done.release()
            self.go.acquire()
        self.left -= 1

    def turn(self, n: int) -> None:
        start = len(self.reports)
        self.left = n
        self.go.release()
        self._wait_done()
        new = self.reports[start:]
        if len(new) != n:
            raise RuntimeError(f"{self.name}: {len(new)} of {n} steps reported")
        self.times += [1.0 / r["iterations_per_second"] for r in new]
        self.losses += [float(r["train_loss"]) for r in new]
        self.tokens += [int(round(r["tokens_per_second"] / r["iterations_per_second"])) for r in new]

    def _run(self):
        from mlx_lm.tuner.callbacks import TrainingCallback

        reports = self.reports

        class Record(TrainingCallback):
            def on_train_loss_report(self, train_info):
                reports.append(train_info)

        a = self.args
        iters = a.warmup + a.rounds * a.steps
        try:
            with tempfile.TemporaryDirectory() as tmp:
                common = dict(batch_size=a.batch, iters=iters, steps_per_report=1, steps_per_eval=iters + 1,
                              steps_per_save=iters + 1, max_seq_length=a.seq + 1,
                              adapter_file=str(Path(tmp) / "adapters.safetensors"))
                if self.name == "mlx-lm":
                    from mlx_lm.tuner.trainer import TrainingArgs, iterate_batches, train

                    def batches(**kw):
                        for b in iterate_batches(**kw):
                            self._my_turn()
                            yield b

                    train(self.model, self.optimizer, self.dataset, None, args=TrainingArgs(**common),
                          iterate_batches=batches, training_callback=Record())
                else:
                    from mlx_lm_lora.trainer.sft_trainer import SFTTrainingArgs, iterate_batches, train_sft

                    def batches(**kw):  # called afresh for every step
                        self._my_turn()
                        yield from iterate_batches(**kw)

                    train_sft(self.model, self.optimizer, self.dataset, None, args=SFTTrainingArgs(loss_type="nll", **common),
                              iterate_batches=batches, training_callback=Record())
        except BaseException as e:  # handed to the main thread
            self.error = e
        finally:
            self.done.release()


def set_trainable(model, which: str) -> None:
    model.unfreeze()
    if which == "layers":  # mlx_lm.lora's train_model for --fine-tune-type full (--num-layers -1)
        model.freeze()
        for layer in model.layers:
            layer.unfreeze()


# ------------------------------------------------------------------------------------ report

def summarise(side: Side, args) -> dict:
    timed = side.times[args.warmup:]
    step_s = statistics.median(timed)
    trained = side.tokens[0]
    return {"side": side.name, "step_ms": 1e3 * step_s, "step_times_ms": [1e3 * t for t in timed],
            "tok_per_s": trained / step_s, "trained_tokens_per_step": trained, "tokens_per_step": side.tokens,
            "peak_mem_bytes": side.resident() + side.transient, "resident_bytes": side.resident(),
            "initial_loss": side.losses[0], "final_loss": side.losses[-1]}


def print_table(rows: list[dict]) -> None:
    print(f"\n{'side':<12} {'step ms':>9} {'min ms':>9} {'tok/s':>8} {'peak mem':>10} {'loss@1':>9} {'loss@end':>9}")
    for r in rows:
        print(f"{r['side']:<12} {r['step_ms']:>9.1f} {min(r['step_times_ms']):>9.1f} {r['tok_per_s']:>8.0f} "
              f"{r['peak_mem_bytes'] / MIB:>6.0f} MiB {r['initial_loss']:>9.6f} {r['final_loss']:>9.6f}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    before = blas_threads()
    try:
        return run(args)
    finally:
        restore_all()  # theirs' kernels as mlx-lm ships them (main may run inside another process: tests)
        if before and args.blas_threads:
            blas_threads(before)


def run(args) -> dict:
    if "mlx-lm-lora" in args.sides and mlx_lm_lora_version() is None:
        raise SystemExit("sft_vs_mlx_lm: mlx_lm_lora does not import here (pip install --no-deps mlx-lm-lora), "
                         "or --sides ours,mlx-lm")
    from importlib.metadata import version

    length = args.seq + 1
    real = not args.synthetic and args.gsm8k and args.tokenizer and (args.gsm8k / "train.jsonl").is_file()
    if real:
        rows, vocab, special = gsm8k_rows(args, length)
    else:
        rows, vocab, special = synthetic_rows(args, length), args.vocab, {"bos": None, "eos": None, "pad": 0}
    config = model_config(args, vocab, special)
    threads = blas_threads(args.blas_threads)
    print(f"mlx {mx.__version__} on {mx.default_device()} (CPU BLAS: {mlxcore.BLAS.name}, {threads or '?'} threads) | "
          f"mlx-lm {version('mlx-lm')} | mlx-lm-lora {mlx_lm_lora_version() or '-'} | os.cpu_count() {os.cpu_count()} | "
          "load avg %.1f %.1f %.1f" % os.getloadavg())
    trained = int(sum(m[1:].sum() for _, m in rows))
    log = io.StringIO()
    with tempfile.TemporaryDirectory() as tmp, metal_working_set_key():
        model_dir = write_model_dir(config, args.seed, Path(tmp) / "model")
        ours = Ours(model_dir, rows, args)
        n_params = num_params(ours.model)
        print(f"model: {'smoke' if args.smoke else args.preset}: hidden {config['hidden_size']}, layers "
              f"{config['num_hidden_layers']}, heads {config['num_attention_heads']} ({config['num_key_value_heads']} kv), "
              f"ffn {config['intermediate_size']}, vocab {vocab}, {n_params / 1e6:.1f}M params, float32, "
              f"trainable: {args.trainable} ({sum(v.size for _, v in tree_flatten(ours.model.trainable_parameters())) / 1e6:.1f}M)")
        print(f"data: {'GSM8K chat rows (MiniMind tokenizer)' if real else 'synthetic rows'}: batch {args.batch} x "
              f"{length} tokens, {trained} trained (answer) tokens a step; AdamW(lr {args.lr:g}), ours: grad clip "
              f"{args.grad_clip or 'off'}, sparse loss {'on' if args.sparse_loss else 'off'}, fused optimizer "
              f"{'on' if ours.step.fused else 'off'}; theirs: {args.their_kernels} attention / SwiGLU")
        print(f"timing: {args.warmup} warmup + {args.rounds} rounds x {args.steps} steps a side, interleaved, median")
        mine = lambda: use_fast_kernels(ours.model)  # noqa: E731
        theirs_k = mine if args.their_kernels == "mlxcore" else restore_all
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            sides = [ours] + [Theirs(name, model_dir, rows, args, log) for name in args.sides[1:]]
            kernels = {s.name: mine if s is ours else theirs_k for s in sides}
            for s in sides:
                if args.warmup:
                    s.measured_turn(args.warmup, kernels[s.name])
            for r in range(args.rounds):
                for s in sides[r % len(sides):] + sides[: r % len(sides)]:
                    s.measured_turn(args.steps, kernels[s.name])
            for s in sides[1:]:
                s.thread.join()
        rows_out = [summarise(s, args) for s in sides]
        profile = ours.profile(args.profile) if args.profile else None
    print_table(rows_out)
    ref = rows_out[0]
    out = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "config": config,
           "params": n_params, "data": "gsm8k" if real else "synthetic", "trained_tokens_per_step": trained,
           "versions": {"mlx": mx.__version__, "mlx-lm": version("mlx-lm"), "mlx-lm-lora": mlx_lm_lora_version()},
           "blas": mlxcore.BLAS.name, "blas_threads": threads, "rows": rows_out, "ratios": {}, "profile": profile}
    print()
    for r in rows_out[1:]:
        diff = abs(ref["initial_loss"] - r["initial_loss"])
        same_tokens = r["tokens_per_step"] == ref["tokens_per_step"] == [trained] * len(ref["tokens_per_step"])
        agree = diff <= LOSS_ATOL
        print(f"first-step loss: ours {ref['initial_loss']:.6f}  {r['side']} {r['initial_loss']:.6f}  |diff| {diff:.1e} "
              f"({'agree' if agree else 'DISAGREE'}, limit {LOSS_ATOL:.0e}); trained tokens a step "
              f"{'the same' if same_tokens else 'DIFFER'}; by fastest steps "
              f"{min(r['step_times_ms']) / min(ref['step_times_ms']):.2f}x")
        out["ratios"][r["side"]] = {"tok_per_s": ref["tok_per_s"] / r["tok_per_s"], "peak_mem": ref["peak_mem_bytes"] / r["peak_mem_bytes"],
                                    "fastest_steps": min(r["step_times_ms"]) / min(ref["step_times_ms"]),
                                    "initial_loss_diff": diff, "initial_losses_agree": agree, "same_tokens": same_tokens}
    if profile:
        print("ours phase by phase (ms a step, each phase compiled and evaluated alone): "
              + ", ".join(f"{k} {v:.1f}" for k, v in profile.items()))
    print("load avg after: %.1f %.1f %.1f" % os.getloadavg())
    for name, q in out["ratios"].items():
        print(f"{FINAL_PREFIX}{name}: tok/s {q['tok_per_s']:.2f}x (>= 1: ours faster)  peak memory {q['peak_mem']:.2f}x "
              f"(<= 1: ours smaller)  first-step loss {'agrees' if q['initial_losses_agree'] else 'DISAGREES'}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
