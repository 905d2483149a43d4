"""A plain PyTorch twin of the model mlxcore trains, so a benchmark can time the same computation.

mlxcore builds mlx-lm's `llama.Model` from an HF-style config dict (`mlxcore.models.model.hf_config`).
`Llama(config)` is that architecture in PyTorch: token embedding; per layer RMSNorm ->
grouped-query attention (q/k/v/o without bias, non-traditional RoPE, causal, scale
1/sqrt(head_dim)) -> residual, RMSNorm -> SwiGLU MLP -> residual; final RMSNorm; logits from
the tied embedding (or `lm_head` when untied). Module names equal mlx-lm's, so
`load_from_mlx` copies weights 1:1 by name. `make_train_step` is the step mlxcore's
`make_step` performs: masked mean cross-entropy, global-norm clipping, then AdamW.

Used by `bench/train_vs_torch.py` (run that) and `tests/bench/test_torch_reference.py`.
This module imports no MLX at top level: `load_from_mlx` only touches MLX arrays it is given.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# MLX's AdamW defaults to bias_correction=False; torch's AdamW always divides by
# (1 - beta**step). Starting torch's step counter here makes beta**step underflow to 0, so
# its own (fused / foreach) kernel applies exactly MLX's update at the same cost.
_NO_BIAS_CORRECTION_STEP = 1e6


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(F, "rms_norm"):  # one fused op (torch >= 2.4)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        xf = x.float()  # accumulate in float32 as MLX's rms_norm does
        return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rope_tables(head_dim: int, theta: float, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * theta^(-2i/head_dim), [max_len, head_dim/2], float32."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Non-traditional layout (mx.fast.rope traditional=False): dim i pairs with i + head_dim/2.
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Attention(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        dim = c["hidden_size"]
        self.n_heads = c["num_attention_heads"]
        self.n_kv_heads = c.get("num_key_value_heads") or self.n_heads
        self.head_dim = c.get("head_dim") or dim // self.n_heads
        bias = c.get("attention_bias", False)
        self.q_proj = nn.Linear(dim, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=self.head_dim**-0.5, enable_gqa=self.n_kv_heads != self.n_heads
        )
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        dim, hidden, bias = c["hidden_size"], c["intermediate_size"], c.get("mlp_bias", False)
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.self_attn = Attention(c)
        self.mlp = MLP(c)
        self.input_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.post_attention_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.embed_tokens = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.layers = nn.ModuleList(TransformerBlock(c) for _ in range(c["num_hidden_layers"]))
        self.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])


class Llama(nn.Module):
    """`Llama(config)(tokens [B, T]) -> logits [B, T, vocab]`, parameters in config's torch_dtype."""

    def __init__(self, config: dict, device: torch.device | str = "cpu"):
        super().__init__()
        if config.get("rope_scaling") or config.get("rope_traditional"):
            raise NotImplementedError("only default non-traditional RoPE is implemented")
        self.config = config
        self.model = LlamaModel(config)
        self.tied = config.get("tie_word_embeddings", True)
        if not self.tied:
            self.lm_head = nn.Linear(config["hidden_size"], config["vocab_size"], bias=False)
        self.to(device=device, dtype=DTYPES[config.get("torch_dtype", "float32")])
        # Registered after .to(dtype): the RoPE tables stay float32 like MLX's frequencies.
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        cos, sin = rope_tables(head_dim, config.get("rope_theta", 10000.0), config.get("max_position_embeddings") or 4096)
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        T = tokens.shape[1]
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        h = self.model.embed_tokens(tokens)
        for layer in self.model.layers:
            h = layer(h, cos, sin)
        h = self.model.norm(h)
        return F.linear(h, self.model.embed_tokens.weight if self.tied else self.lm_head.weight)


def load_from_mlx(torch_model: Llama, mlx_model) -> None:
    """Copy every MLX parameter into the torch parameter of the same name (shapes must match)."""
    import mlx.core as mx  # loaded already (after mlxcore): we were handed an MLX model
    from mlx.utils import tree_flatten

    src = dict(tree_flatten(mlx_model.parameters()))
    dst = dict(torch_model.named_parameters())
    if set(src) != set(dst):
        raise KeyError(f"names differ: only mlx {sorted(set(src) - set(dst))}, only torch {sorted(set(dst) - set(src))}")
    with torch.no_grad():
        for name, p in dst.items():
            # numpy has no bfloat16: go through float32, exact for bf16/fp16 values
            arr = np.array(src[name].astype(mx.float32), copy=True)
            if tuple(arr.shape) != tuple(p.shape):
                raise ValueError(f"{name}: mlx {arr.shape} vs torch {tuple(p.shape)}")
            p.copy_(torch.from_numpy(arr))  # copy_ casts to p's dtype and device


def masked_mean_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of token cross-entropies where mask == 1, over their count: mlxcore's training loss."""
    logits = model(inputs).float()
    losses = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return (losses * mask.reshape(-1)).sum() / mask.sum().clamp(min=1)


def make_optimizer(model: nn.Module, lr: float, betas=(0.9, 0.95), weight_decay: float = 0.01, eps: float = 1e-8):
    """torch's AdamW (fused on CUDA, foreach on CPU) applying MLX AdamW's default update."""
    params = [p for p in model.parameters() if p.requires_grad]
    cuda = params[0].is_cuda
    opt = torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                            fused=True if cuda else None, foreach=None if cuda else True)
    for group in opt.param_groups:  # pre-made state: torch skips its lazy init, keeps our step
        on_device = group["fused"] or group["capturable"]
        for p in group["params"]:
            step = torch.tensor(_NO_BIAS_CORRECTION_STEP, dtype=torch.float32, device=p.device if on_device else "cpu")
            opt.state[p] = {"step": step, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
    return opt


def make_train_step(model: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float = 1.0, compile: bool = False):
    """`step(inputs, targets, mask) -> (mean loss, grad norm)`, tensors on the model's device.

    compile=True runs the forward and loss through `torch.compile` (forward and backward
    graphs); clipping and the optimizer stay torch's own multi-tensor kernels.
    """
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_fn(x, y, m):
        return masked_mean_loss(model, x, y, m)

    if compile:
        loss_fn = torch.compile(loss_fn)

    def step(inputs, targets, mask):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(inputs, targets, mask)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"), foreach=True)
        optimizer.step()
        return loss.detach(), norm

    return step
