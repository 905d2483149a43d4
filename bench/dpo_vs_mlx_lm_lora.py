"""DPO training step: mlxcore's vs mlx-lm-lora's, same model, data and batch, in one run.

    python bench/dpo_vs_mlx_lm_lora.py                     # hidden 512, 8 layers, 8 pairs of 64+64 tokens
    python bench/dpo_vs_mlx_lm_lora.py --hidden 256 --layers 4 --steps 3 --warmup 1 --json r.json
    python bench/dpo_vs_mlx_lm_lora.py --theirs plain      # a plain MLX DPO step instead of mlx-lm-lora
    python bench/dpo_vs_mlx_lm_lora.py --their-kernels mlxcore   # theirs on mlxcore's fused CPU kernels too
    python bench/dpo_vs_mlx_lm_lora.py --blas-threads 1    # on a shared machine (see below)

Ours: the training step `mlxcore.train.step.make_step(model, AdamW, grad_clip, compile=True,
loss=PreferenceLoss("dpo", beta))` on a `PreferenceBatches`-shaped batch (chosen / rejected rows
interleaved, [2B, W]) whose `ref` holds the reference model's log-prob sums, computed once
beforehand by `sequence_logprobs`, the function the reference stage (`mlxcore.preference.
reference`) runs: training holds and runs the policy only. That one-off pass is timed on its
own (its own model, built and freed as the stage does) and printed, together with a row that
adds it to every step: the cost in a one-epoch run, where each batch's reference log-probs are
computed once (E epochs divide it by E).

Theirs (--theirs mlx-lm-lora, the default when it is installed): `mlx_lm_lora.trainer.
dpo_trainer.train_dpo(model, ref_model, AdamW, dataset, args=DPOTrainingArgs(...))`, unchanged,
with the reference model beside the policy (frozen, as its `train.py` loads it) and the
reference log-probs computed in every step, its loss `dpo_loss` (loss_type "sigmoid"). It is
called for warmup + steps iterations, reporting every step (`steps_per_report=1`); a step's time
is 1 / its reported `iterations_per_second` (its clock: the batch from `iterate_dpo_batches`,
the compiled step and its `mx.eval`). One shim: `train_dpo` starts with
`mx.set_wired_limit(mx.device_info()["max_recommended_working_set_size"])`, a Metal-only key
(KeyError on the Linux CPU); while it runs, `mx.device_info()` also reports that key as 0, and
`set_wired_limit` is a no-op on the CPU anyway. --theirs plain (the fallback without
mlx-lm-lora): the usual DPO step written here in plain MLX, policy and reference model in
memory, reference log-probs in every step, chosen and rejected rows in one forward pass.

Both: the same mlx-lm llama model from a config (the same seed, so the same initial weights),
full fine-tuning, AdamW (lr --lr, MLX's default betas 0.9/0.999 and weight decay 0.01: what
mlx-lm-lora's `--optimizer adamw` builds), no gradient clipping by default (mlx-lm-lora clips
none; --grad-clip applies to ours and plain), beta 0.1, one fixed batch of random tokens:
B pairs of a P-token prompt and R-token chosen / rejected replies, the loss on the reply tokens.
Both run with MLX's buffer cache at 1 GiB (what mlxcore's step sets on the CPU) and the BLAS
`mlxcore` loads. Kernels: ours runs mlx-lm's layers through mlxcore's fused CPU attention and
SwiGLU (`use_fast_kernels`, as every mlxcore training step does); theirs, by default, through
mlx-lm's own (`mx.fast.scaled_dot_product_attention`, which on the Linux CPU is MLX's unfused
fallback: most of their step time at these sizes), i.e. what a user of mlx-lm-lora gets.
--their-kernels mlxcore gives theirs the fused kernels too, so the ratio is that of the DPO
steps themselves (reference log-probs precomputed, one policy forward over 2B rows, the fused
cross-entropy) rather than of the attention kernel. Theirs runs first, then ours.

On a machine other jobs share, give --blas-threads 1 (or the cores that are free): MKL's
threads then do not oversubscribe the cores. MLX's unfused CPU attention is many small GEMMs, and
with MKL's default of one thread per core on a busy 2-core machine mlx-lm's forward pass of the
default model took 5-18 s instead of 0.9 s with one thread (mlxcore's kernels: 1.4 s vs 0.6 s),
and mlx-lm-lora's steps varied from 5 s to 128 s.

Reported per side: the median step time of --steps timed steps after --warmup untimed ones;
pairs/s = B / that; tok/s = all positions of the chosen and rejected rows, 2 * B * (P + R), / that;
peak memory = `mx.get_peak_memory()` after `mx.reset_peak_memory()` taken before the side's
models are built (policy, plus theirs' reference model), so weights, optimizer state and
activations all count; load = the 1-minute load average as the side ended (on a shared
machine, a side that ran under more load is slower for it). Ratios ours/theirs: tok/s (>= 1:
ours is faster), peak memory (<= 1: ours takes less). The first step's loss (before any update,
policy == reference) is ln 2 on both sides; they are printed and compared (and, with the same
update rule on both sides, so are the last steps' losses).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import io
import json
import math
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import mlxcore  # noqa: E402  first: it loads a fast BLAS (MKL) before mlx.core binds one
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402

from mlxcore.config import ModelConfig  # noqa: E402
from mlxcore.kernels.patch import restore_all, use_fast_kernels  # noqa: E402
from mlxcore.models.model import from_config, hf_config, num_params  # noqa: E402
from mlxcore.preference.losses import PreferenceLoss, sequence_logprobs  # noqa: E402
from mlxcore.train.step import make_step  # noqa: E402

FINAL_PREFIX = "ratio ours/theirs: "
CACHE_LIMIT = 1 << 30
LOSS_ATOL = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 2e-2}
MIB = 1 << 20


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    shape = p.add_argument_group("model shape (mlx-lm llama, tied embeddings)")
    shape.add_argument("--hidden", type=int, default=512)
    shape.add_argument("--layers", type=int, default=8)
    shape.add_argument("--heads", type=int, default=8)
    shape.add_argument("--kv-heads", type=int, default=2)
    shape.add_argument("--head-dim", type=int, help="default hidden / heads")
    shape.add_argument("--intermediate", type=int, default=1408)
    shape.add_argument("--vocab", type=int, default=6400)
    p.add_argument("--dtype", choices=sorted(LOSS_ATOL), default="float32")
    p.add_argument("--batch", type=int, default=8, help="pairs per step")
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens per row")
    p.add_argument("--response", type=int, default=64, help="reply tokens per row (chosen and rejected alike)")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--grad-clip", type=float, default=0.0, help="ours and plain (mlx-lm-lora does not clip); 0: off")
    p.add_argument("--steps", type=int, default=5, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    p.add_argument("--ref-repeats", type=int, default=3, help="times the one-off reference pass runs (median)")
    p.add_argument("--theirs", choices=["auto", "mlx-lm-lora", "plain"], default="auto",
                   help="auto: mlx-lm-lora if it imports, else the plain MLX step")
    p.add_argument("--their-kernels", choices=["mlx-lm", "mlxcore"], default="mlx-lm",
                   help="attention / SwiGLU for theirs: mlx-lm's own (what its users get) or mlxcore's fused CPU kernels")
    p.add_argument("--blas-threads", type=int, help="MKL threads for both sides (default: MKL's, one per core)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.ref_repeats < 1 or args.batch < 1 or args.prompt < 1 or args.response < 1:
        p.error("--steps, --ref-repeats, --batch, --prompt and --response must be >= 1, --warmup >= 0")
    return args


def model_config(args) -> dict:
    try:
        cfg = ModelConfig(preset="custom", hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                          num_kv_heads=args.kv_heads, head_dim=args.head_dim, intermediate_size=args.intermediate,
                          dtype=args.dtype)
    except ValueError as e:  # pydantic's ValidationError: keep only its messages
        msgs = [err["msg"].removeprefix("Value error, ") for err in e.errors()] if hasattr(e, "errors") else [str(e)]
        raise SystemExit(f"dpo_vs_mlx_lm_lora: bad model shape: {'; '.join(msgs)}") from None
    return hf_config(cfg, args.vocab)


def make_data(args) -> dict:
    """B pairs of random tokens: prompt [B, P], chosen / rejected replies [B, R]."""
    rng = np.random.default_rng(args.seed)
    B, P, R = args.batch, args.prompt, args.response
    return {"prompt": rng.integers(0, args.vocab, (B, P), dtype=np.int32),
            "chosen": rng.integers(0, args.vocab, (B, R), dtype=np.int32),
            "rejected": rng.integers(0, args.vocab, (B, R), dtype=np.int32)}


def our_batch(data: dict) -> dict:
    """The batch dict `PreferenceBatches.collate` makes: rows 2i / 2i+1 = pair i's chosen / rejected,
    the loss mask on the reply's targets (no padding: every row is P + R tokens)."""
    prompt = data["prompt"]
    B, P = prompt.shape
    pairs = np.stack([np.concatenate([prompt, data["chosen"]], 1), np.concatenate([prompt, data["rejected"]], 1)], 1)
    ids = pairs.reshape(2 * B, -1)
    mask = np.zeros(ids.shape, np.float32)
    mask[:, P:] = 1.0
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "mask": mask[:, 1:], "full": ids,
            "last": np.full(2 * B, ids.shape[1] - 1, np.int32), "target": np.zeros(B, np.float32)}


def set_their_kernels(model, args) -> None:
    """mlx-lm's own attention / SwiGLU (the default), or mlxcore's fused ones (module-wide, so the
    reference model built from the same mlx-lm module gets them too)."""
    restore_all()
    if args.their_kernels == "mlxcore":
        use_fast_kernels(model)


def blas_threads(n: int | None = None) -> int | None:
    """MKL's thread count, set to `n` first if given; None when the BLAS is not MKL."""
    if mlxcore.BLAS.name != "mkl" or not mlxcore.BLAS.path:
        return None
    try:
        lib = ctypes.CDLL(mlxcore.BLAS.path)
        if n:
            lib.MKL_Set_Num_Threads(int(n))
        return int(lib.MKL_Get_Max_Threads())
    except (OSError, AttributeError):
        return None


def free() -> None:
    gc.collect()
    mx.clear_cache()


def summarise(name: str, times: list[float], losses: list[float], peak: int, args, active_before: int) -> dict:
    step_s = statistics.median(times)
    tokens = 2 * args.batch * (args.prompt + args.response)
    return {"side": name, "step_ms": 1e3 * step_s, "step_times_ms": [1e3 * t for t in times],
            "tok_per_s": tokens / step_s, "pairs_per_s": args.batch / step_s, "peak_mem_bytes": peak,
            "initial_loss": losses[0], "final_loss": losses[-1], "load_avg_after": os.getloadavg()[0],
            "active_mem_before_bytes": active_before}


def timed_steps(once, args) -> tuple[list[float], list[float]]:
    """Run warmup + steps synchronous steps; (timed steps' seconds, every step's loss)."""
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss = once()  # evaluated (weights, optimizer state, loss) before it returns
        dt = time.perf_counter() - t0
        losses.append(loss.item())  # read after the clock stops
        if i >= args.warmup:
            times.append(dt)
    return times, losses


# ---------------------------------------------------------------------------------------- ours

def reference_pass(config: dict, batch: dict, args) -> tuple[np.ndarray, dict]:
    """The reference stage's work for this batch: its own model (built, then freed), eval mode,
    mlxcore's kernels, `sequence_logprobs` of every row. Timed apart from the model's construction."""
    free()
    mx.reset_peak_memory()
    model = from_config(config, seed=args.seed)
    model.eval()
    use_fast_kernels(model)
    x, y, m = (mx.array(batch[k]) for k in ("inputs", "targets", "mask"))
    times = []
    for _ in range(args.ref_repeats):
        t0 = time.perf_counter()
        logp, _ = sequence_logprobs(model, x, y, m)
        mx.eval(logp)
        times.append(time.perf_counter() - t0)
    ref = np.array(logp, dtype=np.float32)
    info = {"ms": 1e3 * statistics.median(times), "times_ms": [1e3 * t for t in times],
            "peak_mem_bytes": mx.get_peak_memory(), "rows": int(x.shape[0])}
    del model, x, y, m, logp
    free()
    return ref, info


def run_ours(config: dict, data: dict, args) -> tuple[dict, dict]:
    batch = our_batch(data)
    ref, ref_info = reference_pass(config, batch, args)
    batch["ref"] = ref
    active_before = mx.get_active_memory()  # what the previous stages left: should be ~0
    mx.reset_peak_memory()
    model = from_config(config, seed=args.seed)
    optimizer = optim.AdamW(args.lr)
    step, state = make_step(model, optimizer, args.grad_clip, compile=True, loss=PreferenceLoss("dpo", beta=args.beta))
    mx.set_cache_limit(CACHE_LIMIT)  # what make_step set; kept equal for both sides

    def once():
        loss_sum, n, norm = step([batch])
        mx.eval(state, loss_sum, n, norm, step.aux)
        return loss_sum / n

    times, losses = timed_steps(once, args)
    row = summarise("ours: mlxcore make_step + PreferenceLoss('dpo')", times, losses, mx.get_peak_memory(), args, active_before)
    return row, ref_info


# -------------------------------------------------------------------------------------- theirs

def mlx_lm_lora_version() -> str | None:
    try:
        from importlib.metadata import version

        import mlx_lm_lora.trainer.dpo_trainer  # noqa: F401  (it imports: mlx and mlx-lm fit it)
        return version("mlx-lm-lora")
    except Exception:  # not installed, or it does not import with this mlx / mlx-lm
        return None


@contextlib.contextmanager
def metal_working_set_key():
    """`train_dpo` opens with mx.set_wired_limit(mx.device_info()["max_recommended_working_set_size"]);
    that key is Metal's (KeyError on the CPU). Report it as 0 while it runs: a no-op there."""
    info = mx.device_info
    if "max_recommended_working_set_size" in info():
        yield
        return
    mx.device_info = lambda: {**info(), "max_recommended_working_set_size": 0}
    try:
        yield
    finally:
        mx.device_info = info


def run_mlx_lm_lora(config: dict, data: dict, args) -> dict:
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm_lora.trainer.dpo_trainer import DPOTrainingArgs, dpo_loss, train_dpo

    P = args.prompt
    # the dict its DPO dataset yields per example: prompt + reply tokens, and the prompt's length
    dataset = [{"chosen": np.concatenate([p, c]).tolist(), "rejected": np.concatenate([p, r]).tolist(),
                "chosen_prompt_length": P, "rejected_prompt_length": P}
               for p, c, r in zip(data["prompt"], data["chosen"], data["rejected"])]
    reports = []

    class Record(TrainingCallback):
        def on_train_loss_report(self, train_info):
            reports.append(train_info)

    mx.set_cache_limit(CACHE_LIMIT)
    free()
    active_before = mx.get_active_memory()  # what the previous stages left: should be ~0
    mx.reset_peak_memory()
    model = from_config(config, seed=args.seed)
    ref_model = from_config(config, seed=args.seed).freeze()  # as its train.py's load_reference_model
    set_their_kernels(model, args)
    optimizer = optim.AdamW(args.lr)
    iters = args.warmup + args.steps
    log = io.StringIO()
    with tempfile.TemporaryDirectory() as tmp:
        targs = DPOTrainingArgs(batch_size=args.batch, iters=iters, steps_per_report=1, steps_per_eval=iters + 1,
                                steps_per_save=iters + 1, max_seq_length=P + args.response, beta=args.beta,
                                loss_type="sigmoid", adapter_file=str(Path(tmp) / "adapters.safetensors"))
        try:
            with metal_working_set_key(), contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                train_dpo(model, ref_model, optimizer, dataset, None, args=targs, loss_fn=dpo_loss,
                          training_callback=Record(), loss_type="sigmoid")
        except BaseException:
            print(log.getvalue()[-3000:], file=sys.stderr)
            raise
    if len(reports) != iters:
        raise RuntimeError(f"mlx-lm-lora reported {len(reports)} of {iters} steps:\n{log.getvalue()[-2000:]}")
    times = [1.0 / r["iterations_per_second"] for r in reports[args.warmup:]]
    losses = [float(r["train_loss"]) for r in reports]
    peak = round(reports[-1]["peak_memory"] * 1e9)  # its report: mx.get_peak_memory() / 1e9, before it saves
    row = summarise(f"mlx-lm-lora {mlx_lm_lora_version()} train_dpo", times, losses, peak, args, active_before)
    return row


def run_plain(config: dict, data: dict, args) -> dict:
    """The usual DPO step in plain MLX: policy and frozen reference in memory, reference log-probs
    recomputed in every step, chosen and rejected rows in one forward pass, mean loss over pairs."""
    batch = our_batch(data)
    x, y, m = (mx.array(batch[k]) for k in ("inputs", "targets", "mask"))
    mx.set_cache_limit(CACHE_LIMIT)
    free()
    active_before = mx.get_active_memory()  # what the previous stages left: should be ~0
    mx.reset_peak_memory()
    model = from_config(config, seed=args.seed)
    ref_model = from_config(config, seed=args.seed).freeze()
    set_their_kernels(model, args)
    optimizer = optim.AdamW(args.lr)

    def logps(net, x, y, m):
        logits = net(x).astype(mx.float32)
        return (-nn.losses.cross_entropy(logits, y, reduction="none") * m).sum(-1)

    def loss_fn(x, y, m):
        pi, ref = logps(model, x, y, m), mx.stop_gradient(logps(ref_model, x, y, m))
        h = (pi[0::2] - ref[0::2]) - (pi[1::2] - ref[1::2])
        return -nn.log_sigmoid(args.beta * h).mean()

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(x, y, m):
        loss, grads = loss_and_grad(x, y, m)
        if args.grad_clip > 0:
            grads, _ = optim.clip_grad_norm(grads, args.grad_clip)
        optimizer.update(model, grads)
        return loss

    def once():
        loss = step(x, y, m)
        mx.eval(state, loss)
        return loss

    times, losses = timed_steps(once, args)
    row = summarise("plain MLX DPO (policy + reference)", times, losses, mx.get_peak_memory(), args, active_before)
    return row


# --------------------------------------------------------------------------------------- report

def print_table(rows: list[dict]) -> None:
    w = max(len(r["side"]) for r in rows)
    print(f"\n{'side':<{w}} {'step ms':>9} {'min ms':>9} {'pairs/s':>8} {'tok/s':>8} {'peak mem':>10} "
          f"{'loss@1':>9} {'loss@end':>9} {'load':>5}")
    for r in rows:
        mem = f"{r['peak_mem_bytes'] / MIB:.0f} MiB" if r.get("peak_mem_bytes") else "-"
        loss1 = f"{r['initial_loss']:.6f}" if "initial_loss" in r else "-"
        lossn = f"{r['final_loss']:.6f}" if "final_loss" in r else "-"
        load = f"{r['load_avg_after']:.1f}" if "load_avg_after" in r else "-"
        print(f"{r['side']:<{w}} {r['step_ms']:>9.1f} {min(r['step_times_ms']):>9.1f} {r['pairs_per_s']:>8.2f} "
              f"{r['tok_per_s']:>8.0f} {mem:>10} {loss1:>9} {lossn:>9} {load:>5}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    before = blas_threads()
    try:
        return run(args)
    finally:
        if before and args.blas_threads:
            blas_threads(before)  # as it was (main may run inside another process: tests)


def run(args) -> dict:
    version = mlx_lm_lora_version()
    theirs = args.theirs if args.theirs != "auto" else ("mlx-lm-lora" if version else "plain")
    if theirs == "mlx-lm-lora" and not version:
        raise SystemExit("dpo_vs_mlx_lm_lora: mlx_lm_lora does not import here "
                         "(pip install --no-deps mlx-lm-lora), or use --theirs plain")
    config = model_config(args)
    data = make_data(args)
    B, P, R = args.batch, args.prompt, args.response
    tokens = 2 * B * (P + R)
    probe = from_config(config, seed=args.seed)
    params = num_params(probe)
    del probe
    threads = blas_threads(args.blas_threads)
    load = "load avg %.1f %.1f %.1f" % os.getloadavg()
    print(f"mlx {mx.__version__} on {mx.default_device()} (CPU BLAS: {mlxcore.BLAS.name}, "
          f"{threads or '?'} threads) | os.cpu_count() {os.cpu_count()} | {load}")
    if threads and threads > 1 and os.getloadavg()[0] >= 1.0:
        print(f"note: other work is running (load {os.getloadavg()[0]:.1f}) and MKL uses {threads} threads: "
              "timings suffer from oversubscription, mlx-lm's unfused attention most; --blas-threads 1 avoids it")
    print(f"model: llama, hidden {config['hidden_size']}, layers {config['num_hidden_layers']}, heads "
          f"{config['num_attention_heads']} ({config['num_key_value_heads']} kv), head_dim {config['head_dim']}, "
          f"ffn {config['intermediate_size']}, vocab {args.vocab}, {params / 1e6:.1f}M params, {args.dtype}, full fine-tuning")
    print(f"step: {B} pairs x (prompt {P} + reply {R}) = {2 * B} rows, {tokens} tokens; DPO beta {args.beta}, "
          f"AdamW(lr {args.lr:g}), grad clip {args.grad_clip or 'off'}; {args.warmup} warmup + {args.steps} timed "
          f"steps each, median")
    what = (f"mlx-lm-lora {version} train_dpo" if theirs == "mlx-lm-lora" else "plain MLX DPO step written here")
    kernels = "mlx-lm's own" if args.their_kernels == "mlx-lm" else "mlxcore's fused"
    print(f"theirs: {what} (reference model in memory, ref log-probs every step), {kernels} attention / SwiGLU; "
          f"ours: mlxcore's fused attention / SwiGLU")

    their_row = (run_mlx_lm_lora if theirs == "mlx-lm-lora" else run_plain)(config, data, args)
    our_row, ref_info = run_ours(config, data, args)
    amortised = {"side": "ours + reference pass (1 epoch)", "step_ms": our_row["step_ms"] + ref_info["ms"],
                 "step_times_ms": [t + ref_info["ms"] for t in our_row["step_times_ms"]],
                 "peak_mem_bytes": our_row["peak_mem_bytes"]}
    amortised |= {"tok_per_s": tokens / (amortised["step_ms"] / 1e3), "pairs_per_s": B / (amortised["step_ms"] / 1e3)}

    print(f"\nreference pass (once, its own stage and model): {ref_info['ms']:.1f} ms for this batch's {ref_info['rows']} "
          f"rows (median of {args.ref_repeats}), peak {ref_info['peak_mem_bytes'] / MIB:.0f} MiB in that stage; "
          f"amortised: +{ref_info['ms']:.1f} ms per step in one epoch, +{ref_info['ms'] / 3:.1f} in 3 epochs")
    print_table([our_row, amortised, their_row])

    ratio_tok = our_row["tok_per_s"] / their_row["tok_per_s"]
    ratio_tok_ref = amortised["tok_per_s"] / their_row["tok_per_s"]
    ratio_mem = our_row["peak_mem_bytes"] / their_row["peak_mem_bytes"]
    # the fastest step is the one least disturbed by other load: a second opinion on a busy box
    ratio_fastest = min(their_row["step_times_ms"]) / min(our_row["step_times_ms"])
    diff = abs(our_row["initial_loss"] - their_row["initial_loss"])
    agree = diff <= LOSS_ATOL[args.dtype]
    print(f"\ninitial loss (policy == reference): ours {our_row['initial_loss']:.6f}  theirs "
          f"{their_row['initial_loss']:.6f}  ln 2 = {math.log(2):.6f}  |diff| {diff:.1e} "
          f"({'agree' if agree else 'DISAGREE'}, limit {LOSS_ATOL[args.dtype]:.0e})")
    print(f"tok/s ratio by each side's fastest step: {ratio_fastest:.2f}x; with the reference pass added "
          f"(one epoch): {ratio_tok_ref:.2f}x")
    print("load avg after: %.1f %.1f %.1f" % os.getloadavg())
    print(f"{FINAL_PREFIX}tok/s {ratio_tok:.2f}x (>= 1: ours faster)  peak memory {ratio_mem:.2f}x (<= 1: ours smaller)")

    result = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "config": config, "params": params, "tokens_per_step": tokens, "reference_impl": theirs,
              "their_kernels": args.their_kernels,
              "mlx_lm_lora_version": version if theirs == "mlx-lm-lora" else None,
              "mlx": {"version": mx.__version__, "device": str(mx.default_device()), "blas": mlxcore.BLAS.name,
                      "blas_threads": threads},
              "ours": our_row, "ours_with_reference": amortised, "reference_pass": ref_info, "theirs": their_row,
              "ratio_tok_per_s": ratio_tok, "ratio_tok_per_s_with_reference": ratio_tok_ref,
              "ratio_peak_mem": ratio_mem, "ratio_fastest_steps": ratio_fastest, "initial_loss_diff": diff, "initial_losses_agree": agree}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
