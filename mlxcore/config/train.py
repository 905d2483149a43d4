"""Training: the loop's settings, distributed launch, sampling after a stage."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from mlxcore.config.base import _Strict
from mlxcore.config.model import LoRAConfig, QuantizeConfig


class HostConfig(_Strict):
    """One host of an `mlx.launch` hostfile (what `mlx.distributed_config` writes)."""

    ssh: str = Field(min_length=1, description="The name to reach it by: ssh's host, exec_prefix's {ssh}.")
    ips: list[str] = Field(default_factory=list, description="Addresses the ring backend listens on (one port per "
                           "rank and address); nccl / jaccl use the first host's first one as the coordinator.")
    rdma: list[str | list[str] | None] = Field(default_factory=list, description="jaccl: RDMA device to each host.")


class DistributedConfig(_Strict):
    """Where the `world_size` ranks run: this machine (no hosts), or hosts started over ssh / a command prefix."""

    backend: Literal["ring", "mpi", "nccl", "jaccl"] = Field(
        "ring", description="mx.distributed backend: ring (TCP), mpi (through mpirun), nccl (CUDA GPUs), jaccl (RDMA).")
    hosts: str | list[HostConfig] = Field(
        default_factory=list, description="An mlx.launch hostfile (JSON list of {ssh, ips}, or {hosts: [...], envs, "
        "backend}) or the same list inline; empty: every rank on this machine.")
    ranks_per_host: int = Field(1, gt=0, description="Ranks started on each host (one per GPU with nccl).")
    exec_prefix: str = Field("", description="Command that starts a rank on a host, with {ssh} {ip} {rank} "
                             "{local_rank}; empty: `ssh -o BatchMode=yes {ssh}`. A prefix that runs ssh gets the rank's "
                             "command as one quoted string, any other `sh -c COMMAND`, e.g. `ip netns exec {ssh}`.")
    python: str = Field("", description="Python on the hosts; empty: this one's path (the same venv on every host).")
    threads_per_rank: int = Field(0, ge=0, description="BLAS / OpenMP threads of a rank; 0: the host's cores / ranks_per_host.")
    starting_port: int = Field(32323, gt=0, lt=65536, description="ring: first port, +1 per rank and address; jaccl: "
                               "the coordinator's port (as mlx.launch).")
    nccl_port: int = Field(12345, gt=0, lt=65536, description="nccl: the coordinator's port (as mlx.launch).")

    @field_validator("exec_prefix")
    @classmethod
    def _known_fields(cls, v: str) -> str:
        try:
            v.format(ssh="h", ip="0.0.0.0", rank=0, local_rank=0)
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"{v!r}: only {{ssh}} {{ip}} {{rank}} {{local_rank}} can be filled in ({e})") from None
        return v


class TrainConfig(_Strict):
    """One optimisation run: optimizer, schedule (linear warmup, cosine to a floor), memory knobs."""

    steps: int = Field(300, gt=0, description="Optimizer steps.")
    batch_size: int = Field(16, gt=0, description="Sequences per micro-batch.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    seq_len: int = Field(128, gt=1, description="Tokens per packed sequence / SFT truncation length.")
    lr: float = Field(1e-3, ge=0, description="Peak learning rate; 0 trains nothing (a control run).")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine floor as a fraction of lr.")
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    grad_clip: float = Field(1.0, ge=0, description="Max global grad norm; 0 disables clipping.")
    eval_every: int = Field(100, ge=0, description="Steps between held-out evals; 0: only at the ends.")
    eval_batches: int = Field(8, gt=0)
    save_every: int = Field(100, ge=0, description="Steps between checkpoints; 0: only the final one.")
    keep_last: int = Field(2, gt=0, description="Checkpoints kept in checkpoints/.")
    log_every: int = Field(10, gt=0)
    seed: int = 0
    compile: bool = True
    # -- what trains
    fine_tune_type: Literal["full", "lora", "dora"] = Field(
        "full", description="full: every weight; lora/dora: adapters on a frozen base (mlx-lm's names).")
    lora: LoRAConfig = LoRAConfig()
    quantize: QuantizeConfig | None = Field(None, description="QLoRA: quantize the frozen base (lora/dora only).")
    # -- optimizer
    optimizer: Literal["adamw", "adafactor", "lion", "muon"] = Field(
        "adamw", description="muon: Muon on hidden weight matrices, AdamW on embeddings, norms and head.")
    optimizer_state_dtype: Literal["float32", "param"] = Field(
        "float32", description="AdamW moments in float32, or in the parameters' dtype (halves state for bf16).")
    muon_lr: float = Field(0.02, gt=0, description="Peak learning rate of the Muon part (optimizer: muon).")
    fused_optimizer: Literal["auto", "on", "off"] = Field(
        "auto", description="on: clip + update over concatenated buffers (adamw/lion/sgd); auto: AdamW as "
                            "multi-tensor kernels (CPU; CUDA, over flat buffers kept between steps) where they apply; "
                            "off: MLX's per-tensor update.")
    # -- memory
    grad_checkpoint: int = Field(0, ge=0, description="Recompute activations in segments of N layers; 0: off.")
    loss_chunk: int = Field(0, ge=0, description="Tokens per logits chunk in the loss (never the full [B,T,V]); 0: off.")
    sparse_loss: bool = Field(False, description="Compute logits only where the loss mask is 1 (SFT).")
    bucket: Literal["none", "length", "labels"] = Field(
        "none", description="SFT: batch rows of similar length / label count (less padding, fewer shapes).")
    bucket_window: int = Field(32, gt=0, description="Batches per sorting window when bucketing.")
    pad_multiple: int = Field(32, gt=0, description="SFT rows (and sparse label counts) pad to a multiple of this.")
    pack: bool | Literal["auto"] = Field(
        False, description="SFT: pack rows into seq_len sequences (best-fit decreasing), each row attending to itself "
        "with positions from 0; batch_size counts packs; bucket is then unused. auto: pack where the model and data "
        "allow (mlx-lm llama / qwen2 / qwen3, not a weighted mixture), else rows (the log says which).")
    # -- scale and diagnostics
    world_size: int = Field(1, gt=0, description="Data-parallel ranks (mx.distributed); batch_size is per rank.")
    distributed: DistributedConfig = Field(default_factory=DistributedConfig, description="Where the ranks run "
                                           "(README: Scale out); the job dir must be on a filesystem every host shares.")
    profile_timing: bool = Field(False, description="Time data, forward+backward, clip and optimizer separately.")

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} exceeds steps={self.steps}")
        if self.quantize is not None and self.fine_tune_type == "full":
            raise ValueError("quantize (QLoRA) needs fine_tune_type lora or dora: quantized weights cannot train")
        return self


class SampleConfig(_Strict):
    num_prompts: int = Field(4, ge=0)
    max_tokens: int = Field(48, gt=0)
    temperature: float = Field(0.0, ge=0, description="0 means greedy.")
    top_p: float = Field(1.0, gt=0, le=1)
