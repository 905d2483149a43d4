"""`mlxflow speed`: how fast a training setup runs here, on synthetic data, and how much memory it takes.

One measurement builds the model (a preset or a local model dir), applies the same knobs the
trainer uses (fine-tune type, QLoRA, gradient checkpointing, chunked / sparse loss, optimizer),
runs `warmup` steps (compilation) and then `steps` timed steps on random tokens, and reports the
median step time, tokens/s, active and peak memory, MFU (see `stats`), with `profile_timing` the
time of each phase (each synchronised on its own) and what the clip and optimizer add inside the
compiled step (`Stepper.update_cost`: the whole step against forward + backward alone,
interleaved), and optionally decode
speed: tokens/s of greedy generation after a `prefill`-token prompt, through mlx-lm's
`generate_step`. `mask_density` < 1 puts the loss on only the last fraction of each row, as in
SFT, which is what the sparse loss saves on.

A batch-size sweep runs each point in its own process, so one that runs out of memory is
reported as `OOM` instead of ending the sweep, and each point starts with empty memory.
`max_memory_gb` caps a point's process (RLIMIT_DATA on Linux CPUs, where MLX does not enforce
`mx.set_memory_limit`); MLX's CPU allocator cannot report a failed allocation, so a point that
dies by a signal under that cap is counted as out of memory.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from statistics import median
from typing import Literal

import mlxcore  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from mlxcore.models import adapters
from mlxcore.train import optimizers
from mlxcore.models import remat
from mlxcore.perf import stats
from mlxcore.config import LoRAConfig, ModelConfig, QuantizeConfig, TrainConfig
from mlxcore.train.losses import Loss
from mlxcore.models.model import from_config, hf_config, num_params
from mlxcore.models.checkpoint import load as load_model
from mlxcore.train.step import make_step

MIB = 1 << 20


class SpeedConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    preset: Literal["tiny", "200mb", "tiny-moe", "200mb-moe", "custom"] = "tiny"
    model: dict = Field(default_factory=dict, description="ModelConfig overrides (custom shapes).")
    model_dir: str | None = Field(None, description="A local HF / mlx-lm model dir instead of a preset.")
    vocab_size: int = 6400
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    batch_size: int = 8
    seq_len: int = 256
    steps: int = 5
    warmup: int = 2
    fine_tune_type: Literal["full", "lora", "dora"] = "full"
    lora_rank: int = 8
    quantize_bits: int | None = None
    group_size: int = 64
    grad_checkpoint: int = 0
    loss_chunk: int = 0
    sparse_loss: bool = False
    mask_density: float = Field(1.0, gt=0, le=1)
    optimizer: Literal["adamw", "adafactor", "lion", "muon"] = "adamw"
    fused_optimizer: Literal["auto", "on", "off"] = "auto"
    compile: bool = True
    profile_timing: bool = False
    decode_tokens: int = Field(0, ge=0, description="Tokens to generate after the prefill; 0: skip decode.")
    prefill: int = 1024
    seed: int = 0

    def train_config(self) -> TrainConfig:
        q = QuantizeConfig(bits=self.quantize_bits, group_size=self.group_size) if self.quantize_bits else None
        return TrainConfig(steps=max(self.steps + self.warmup, 1), batch_size=self.batch_size, seq_len=self.seq_len,
                           lr=1e-4, warmup_steps=0, fine_tune_type=self.fine_tune_type, lora=LoRAConfig(rank=self.lora_rank),
                           quantize=q, grad_checkpoint=self.grad_checkpoint, loss_chunk=self.loss_chunk,
                           sparse_loss=self.sparse_loss, optimizer=self.optimizer, compile=self.compile,
                           fused_optimizer=self.fused_optimizer,
                           profile_timing=self.profile_timing, seed=self.seed)


def _model(cfg: SpeedConfig):
    if cfg.model_dir:
        return load_model(cfg.model_dir)
    mc = ModelConfig(preset=cfg.preset, dtype=cfg.dtype, **cfg.model)
    config = hf_config(mc, cfg.vocab_size)
    return from_config(config, seed=cfg.seed), config


def _batch(cfg: SpeedConfig, vocab: int):
    rng = np.random.default_rng(cfg.seed)
    shape = (cfg.batch_size, cfg.seq_len)
    mask = np.zeros(shape, np.float32)
    mask[:, cfg.seq_len - max(1, round(cfg.seq_len * cfg.mask_density)):] = 1.0  # the "answer" ends each row
    return rng.integers(0, vocab, shape, dtype=np.int32), rng.integers(0, vocab, shape, dtype=np.int32), mask


def decode_speed(model, vocab: int, prefill: int, tokens: int) -> dict:
    """Prompt-processing and greedy-decode tokens/s through mlx-lm's generation loop."""
    from mlx_lm.generate import generate_step

    prompt = mx.array(np.random.default_rng(1).integers(0, vocab, prefill, dtype=np.int32))
    t0 = time.perf_counter()
    t_first, n = None, 0
    for n, _ in enumerate(generate_step(prompt, model, max_tokens=tokens), start=1):
        if t_first is None:
            t_first = time.perf_counter()
    t_end = time.perf_counter()
    return {"prefill_tok_per_s": prefill / (t_first - t0),
            "decode_tok_per_s": (n - 1) / max(t_end - t_first, 1e-9) if n > 1 else None}


def measure(cfg: SpeedConfig) -> dict:
    """One in-process measurement (see the module docstring)."""
    tcfg = cfg.train_config()
    model, config = _model(cfg)
    mx.random.seed(cfg.seed)
    adapters.prepare(model, tcfg)
    remat.checkpoint_layers(model, tcfg.grad_checkpoint)
    optimizer = optimizers.build(tcfg)
    step, state = make_step(model, optimizer, tcfg.grad_clip, tcfg.compile, Loss(tcfg.loss_chunk, tcfg.sparse_loss),
                            profile=tcfg.profile_timing, fused=tcfg.fused_optimizer)
    batch = _batch(cfg, config["vocab_size"])
    mx.eval(model.parameters())
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    for _ in range(cfg.warmup):
        mx.eval(state, step([batch]))
    warmup_s = time.perf_counter() - t0
    times, phases = [], {}
    for _ in range(cfg.steps):
        t0 = time.perf_counter()
        out = step([batch])
        mx.eval(state, out)
        times.append(time.perf_counter() - t0)
        for k, v in step.timings.items():
            phases[k] = phases.get(k, 0.0) + v / cfg.steps
    step_s = median(times)
    tokens = cfg.batch_size * cfg.seq_len
    result = {
        "status": "ok", "batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "dtype": cfg.dtype,
        "fine_tune_type": cfg.fine_tune_type, "quantize_bits": cfg.quantize_bits,
        "params": num_params(model), "trainable_params": adapters.num_trainable(model),
        "step_ms": 1e3 * step_s, "tok_per_s": tokens / step_s, "warmup_s": warmup_s,
        "loss": (out[0] / mx.maximum(out[1], 1)).item(),
        "active_mib": mx.get_active_memory() / MIB, "peak_mib": mx.get_peak_memory() / MIB,
        "device": str(mx.default_device()), "fused_optimizer": step.fused, "one_kernel": step.one_kernel,
    }
    result |= {f"ms_{k}": v for k, v in phases.items()}
    if cfg.profile_timing and cfg.compile:  # the clip and optimizer inside the compiled step (see update_cost)
        result["in_step_ms"] = step.update_cost(batch, max(cfg.steps, 3))
    st = stats.report(config, cfg.seq_len, cfg.dtype, result["tok_per_s"], adapters=cfg.fine_tune_type != "full")
    result |= {"flops_per_token": st["flops_per_token_train"], "peak_tflops": st["peak_flops"] / 1e12, "mfu": st["mfu"]}
    if cfg.decode_tokens:
        remat.remove(model)
        model.eval()
        result |= decode_speed(model, config["vocab_size"], cfg.prefill, cfg.decode_tokens)
    return result


def _is_oom(text: str) -> bool:
    text = text.lower()
    return any(s in text for s in ("out of memory", "bad_alloc", "unable to allocate", "cannot allocate", "memoryerror"))


def run_point(cfg: SpeedConfig, max_memory_gb: float | None = None, timeout: float | None = None) -> dict:
    """`measure(cfg)` in a child process; out-of-memory and crashes come back as a status."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    limit = int(max_memory_gb * (1 << 30)) if max_memory_gb else None

    def cap():  # in the child, before exec
        if limit:
            resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))

    base = {"batch_size": cfg.batch_size, "seq_len": cfg.seq_len}
    try:
        proc = subprocess.run([sys.executable, "-m", "mlxcore.perf.speed", cfg.model_dump_json()], capture_output=True,
                              text=True, env=env, timeout=timeout, preexec_fn=cap)
    except subprocess.TimeoutExpired:
        return {**base, "status": "timeout"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = proc.stderr.strip().splitlines()[-1:] or [""]
    killed = proc.returncode < 0
    if _is_oom(proc.stderr) or (killed and (limit or -proc.returncode == signal.SIGKILL)):
        why = f"killed by signal {-proc.returncode}" if killed else tail[0]
        return {**base, "status": "OOM", "detail": why + (f" (limit {max_memory_gb} GB)" if limit else "")}
    return {**base, "status": "error", "detail": tail[0][:300]}


def sweep(cfg: SpeedConfig, batch_sizes: list[int], max_memory_gb: float | None = None) -> list[dict]:
    return [run_point(cfg.model_copy(update={"batch_size": b}), max_memory_gb) for b in batch_sizes]


def format_table(rows: list[dict]) -> str:
    cols = [("batch", "batch_size", "{}"), ("seq", "seq_len", "{}"), ("status", "status", "{}"),
            ("step ms", "step_ms", "{:.1f}"), ("tok/s", "tok_per_s", "{:,.0f}"), ("active MiB", "active_mib", "{:,.0f}"),
            ("peak MiB", "peak_mib", "{:,.0f}"), ("MFU", "mfu", "{:.1%}"), ("decode tok/s", "decode_tok_per_s", "{:,.1f}")]
    cols = [c for c in cols if any(r.get(c[1]) is not None for r in rows)]
    cells = [[c[0] for c in cols]] + [[fmt.format(r[k]) if r.get(k) is not None else "-" for _, k, fmt in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    for r in rows:
        if r.get("detail"):
            lines.append(f"batch {r['batch_size']}: {r['status']}: {r['detail']}")
    return "\n".join(lines)


if __name__ == "__main__":  # a sweep point: python -m mlxcore.perf.speed '<SpeedConfig JSON>'
    print(json.dumps(measure(SpeedConfig.model_validate_json(sys.argv[1]))))
