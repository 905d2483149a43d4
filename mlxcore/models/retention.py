"""Power Retention (arXiv 2507.04239): a LLaMA-like decoder whose attention is symmetric power retention.

Per head, with queries `q` (already scaled by 1/sqrt(head_dim)), keys `k`, values `v` and a log-gate
`log_g[t] <= 0` (logsigmoid of a per-head projection of the token), G = cumsum(log_g):

    A[i, j] = (q_i . k_j)^p * exp(G_i - G_j)   for j <= i, else 0       (p even)
    y_i     = sum_j A[i, j] v_j / (sum_j A[i, j] + EPS)

`(q . k)^p = phi(q) . phi(k)` where phi is the symmetric power expansion: one feature per multiset of
p indices of the head dim, the product of those coordinates times sqrt(multinomial coefficient), so
D = C(d + p - 1, p) features instead of d^p. Hence three equal forms:

  quadratic   `retention_quadratic`: the T x T matrix A above (the reference; O(T^2)).
  chunked     `retention_chunked`: chunks of C tokens; within a chunk the quadratic form, across
              chunks a state S = sum_j decay * phi(k_j) v_j^T (D x e) and normaliser z = sum_j decay *
              phi(k_j) (D), carried from chunk to chunk. Training and prompt prefill; any T (the last
              chunk is padded with zero keys, which add nothing, and log-gate 0, which decays nothing).
  recurrent   `retention_recurrent`: one token at a time, S <- exp(g) S + phi(k) v^T, z <- exp(g) z +
              phi(k), y = phi(q) S / (phi(q) . z + EPS). Generation: a fixed-size state per layer.

All exponents are of non-positive numbers (decays), so nothing overflows; the state is float32.

`Model` / `ModelArgs` follow mlx-lm's model modules (`model.model.embed_tokens`, `model.layers`,
`sanitize`, `make_cache`), so mlx-lm's loader (with `get_model_classes`, see models/model.py),
generation loop and our training loop take it as they take llama. `RetentionCache` is its cache:
the recurrent state of one layer, whose size does not depend on the context length.

Plain MLX ops only (no kernels); never imports prefect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from itertools import combinations_with_replacement
from typing import Any, Optional

import mlxcore  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs
from mlx_lm.models.cache import _BaseCache

EPS = 1e-6  # added to the normaliser, in all three forms alike


# ------------------------------------------------------------------ the symmetric power expansion


@lru_cache(maxsize=None)
def _sympow_coef(d: int, p: int) -> mx.array:
    """sqrt(multinomial coefficient) per multiset of p indices, in lexicographic order."""
    coef = []
    for c in combinations_with_replacement(range(d), p):
        n = math.factorial(p)
        for i in set(c):
            n //= math.factorial(c.count(i))
        coef.append(math.sqrt(n))
    return mx.array(coef, dtype=mx.float32)


def expanded_dim(d: int, p: int) -> int:
    """D = C(d + p - 1, p): the number of features of phi for head dim d and degree p."""
    return math.comb(d + p - 1, p)


def _monomials(x: mx.array, p: int) -> mx.array:
    """The products x_i1 * ... * x_ip over i1 <= ... <= ip, lexicographic (slices: no gather)."""
    if p == 1:
        return x
    d = x.shape[-1]
    return mx.concatenate([x[..., i: i + 1] * _monomials(x[..., i:], p - 1) for i in range(d)], axis=-1)


def sympow(x: mx.array, p: int) -> mx.array:
    """phi(x) along the last axis: phi(x) . phi(y) == (x . y)^p."""
    return _monomials(x, p) * _sympow_coef(x.shape[-1], p).astype(x.dtype)


def check_degree(p: int) -> None:
    if not isinstance(p, int) or p < 1 or p % 2:
        raise ValueError(f"retention degree must be a positive even integer, got {p!r}")


# ------------------------------------------------------------------ the three forms
# q, k, v: [B, H, T, d] (q pre-scaled); log_g: [B, H, T] or None (no gating); state: (S [B,H,D,e], z [B,H,D])


def retention_quadratic(q, k, v, log_g, p: int) -> mx.array:
    """The direct O(T^2) form: y_i = sum_{j<=i} (q_i.k_j)^p e^{G_i-G_j} v_j / (sum ... + EPS)."""
    check_degree(p)
    T = q.shape[2]
    causal = mx.tril(mx.ones((T, T), dtype=mx.bool_))
    a = (q @ k.swapaxes(-1, -2)) ** p
    if log_g is not None:
        G = mx.cumsum(log_g.astype(mx.float32), axis=-1)
        a = a * mx.exp(mx.where(causal, G[..., :, None] - G[..., None, :], 0.0)).astype(a.dtype)
    a = mx.where(causal, a, 0.0)
    return (a @ v) / (a.sum(-1, keepdims=True) + EPS)


def zero_state(B: int, H: int, d: int, e: int, p: int) -> tuple[mx.array, mx.array]:
    D = expanded_dim(d, p)
    return mx.zeros((B, H, D, e), dtype=mx.float32), mx.zeros((B, H, D), dtype=mx.float32)


def retention_recurrent(q, k, v, log_g, p: int, state=None) -> tuple[mx.array, tuple[mx.array, mx.array]]:
    """Token by token with a fixed-size state: (y [B,H,T,e], final state)."""
    check_degree(p)
    B, H, T, d = q.shape
    S, z = state if state is not None else zero_state(B, H, d, v.shape[-1], p)
    fq, fk = sympow(q, p), sympow(k, p)
    outs = []
    for t in range(T):
        if log_g is not None:
            g = mx.exp(log_g[:, :, t].astype(mx.float32))
            S, z = S * g[..., None, None], z * g[..., None]
        kt = fk[:, :, t].astype(mx.float32)
        S = S + kt[..., :, None] * v[:, :, t, None, :].astype(mx.float32)
        z = z + kt
        qt = fq[:, :, t, None, :].astype(mx.float32)  # [B, H, 1, D]
        num = qt @ S  # [B, H, 1, e]
        den = (qt * z[:, :, None, :]).sum(-1, keepdims=True)
        outs.append((num / (den + EPS)).astype(v.dtype))
    return mx.concatenate(outs, axis=2), (S, z)


def retention_chunked(q, k, v, log_g, p: int, chunk: int, state=None,
                      need_state: bool = True) -> tuple[mx.array, tuple[mx.array, mx.array] | None]:
    """Intra-chunk quadratic attention plus the carried state of all earlier chunks: (y, final state).

    The normaliser rides along as an extra value column of ones: [S | z] = sum decay * phi(k) [v | 1]^T.
    `need_state=False` (training: no cache) returns no final state, and a sequence that fits in one
    chunk then never expands phi at all: the quadratic form within it is the whole answer."""
    check_degree(p)
    if chunk < 1:
        raise ValueError(f"retention chunk size must be >= 1, got {chunk}")
    B, H, T, d = q.shape
    e = v.shape[-1]
    C = min(chunk, T)
    pad = (-T) % C
    if log_g is None:
        log_g = mx.zeros((B, H, T), dtype=mx.float32)
    log_g = log_g.astype(mx.float32)
    v1 = mx.concatenate([v.astype(mx.float32), mx.ones((B, H, T, 1), dtype=mx.float32)], axis=-1)
    if pad:
        widths = [(0, 0), (0, 0), (0, pad), (0, 0)]
        q, k, v1 = mx.pad(q, widths), mx.pad(k, widths), mx.pad(v1, widths)
        log_g = mx.pad(log_g, [(0, 0), (0, 0), (0, pad)])
    n = (T + pad) // C
    q, k, v1 = (x.reshape(B, H, n, C, x.shape[-1]) for x in (q, k, v1))
    Gc = mx.cumsum(log_g.reshape(B, H, n, C), axis=-1)  # inclusive, within each chunk
    a = Gc[..., -1]  # [B, H, n]: the log-decay of a whole chunk

    # within the chunk: the quadratic form
    causal = mx.tril(mx.ones((C, C), dtype=mx.bool_))
    w = (q @ k.swapaxes(-1, -2)).astype(mx.float32) ** p
    w = mx.where(causal, w * mx.exp(mx.where(causal, Gc[..., :, None] - Gc[..., None, :], 0.0)), 0.0)
    out = w @ v1  # [B, H, n, C, e + 1]: numerator | denominator
    if n == 1 and state is None and not need_state:
        y = (out[..., :e] / (out[..., e:] + EPS)).astype(v.dtype).reshape(B, H, C, e)
        return (y[:, :, :T] if pad else y), None

    # each chunk's own state [S | z], decayed to the chunk's end
    fk = sympow(k, p).astype(mx.float32) * mx.exp(a[..., None] - Gc)[..., None]  # [B, H, n, C, D]
    D = fk.shape[-1]
    dS = mx.einsum("bhncD,bhnce->bhnDe", fk, v1).reshape(B, H, n, D * (e + 1))

    # the state at the start of chunk c: sum over c' < c of dS[c'] decayed through chunks c'+1 .. c-1
    cumA = mx.cumsum(a, axis=-1)
    Aex = cumA - a
    strict = mx.tril(mx.ones((n, n), dtype=mx.bool_), k=-1)
    M = mx.where(strict, mx.exp(mx.where(strict, Aex[..., :, None] - cumA[..., None, :], 0.0)), 0.0)  # [B,H,n,n]
    S_start = (M @ dS).reshape(B, H, n, D, e + 1)
    S_end = (mx.exp(cumA[..., -1:] - cumA)[..., None, :] @ dS).reshape(B, H, D, e + 1)  # after the last chunk
    if state is not None:
        S0 = mx.concatenate([state[0], state[1][..., None]], axis=-1)  # [B, H, D, e + 1]
        S_start = S_start + mx.exp(Aex)[..., None, None] * S0[:, :, None]
        S_end = S_end + mx.exp(cumA[..., -1])[..., None, None] * S0

    fq = sympow(q, p).astype(mx.float32) * mx.exp(Gc)[..., None]  # [B, H, n, C, D]
    out = out + fq @ S_start
    y = (out[..., :e] / (out[..., e:] + EPS)).astype(v.dtype).reshape(B, H, n * C, e)
    return (y[:, :, :T] if pad else y), (S_end[..., :e], S_end[..., e])


# ------------------------------------------------------------------ the cache


class RetentionCache(_BaseCache):
    """One layer's recurrent state (S, z) and the number of tokens it has absorbed; size fixed.

    Batched generation (mlx-lm's BatchGenerator): `merge` / `extend` / `filter` / `extract` act on the
    batch axis; `prepare(lengths=...)` marks the right padding of a batch of prompts, whose tokens then
    add nothing to the state (key 0, log-gate 0) until `finalize()`."""

    def __init__(self):
        self.S: Optional[mx.array] = None
        self.z: Optional[mx.array] = None
        self.offset = 0
        self.lengths: Optional[mx.array] = None
        self._seen = 0

    def valid(self, T: int) -> Optional[mx.array]:
        """[B, T] True where a token of this call is a real one (not right padding); None: all are."""
        if self.lengths is None:
            return None
        return (self._seen + mx.arange(T))[None, :] < self.lengths[:, None]

    def advance(self, T: int) -> None:
        self.offset += T
        self._seen += T

    def prepare(self, lengths=None, **kwargs):
        self.lengths, self._seen = (mx.array(lengths) if lengths is not None else None), 0

    def finalize(self):
        self.lengths = None

    @classmethod
    def merge(cls, caches):
        out = cls()
        full = [c for c in caches if not c.empty()]
        if full:
            S0, z0 = full[0].S, full[0].z
            out.S = mx.concatenate([c.S if not c.empty() else mx.zeros_like(S0[:1]) for c in caches])
            out.z = mx.concatenate([c.z if not c.empty() else mx.zeros_like(z0[:1]) for c in caches])
        out.offset = max(c.offset for c in caches)
        return out

    def extend(self, other):
        if self.empty() or other.empty():
            raise ValueError("RetentionCache.extend needs two caches with a state")
        self.S, self.z = mx.concatenate([self.S, other.S]), mx.concatenate([self.z, other.z])
        self.offset = max(self.offset, other.offset)

    def filter(self, batch_indices):
        if not self.empty():
            idx = mx.array(batch_indices) if not isinstance(batch_indices, mx.array) else batch_indices
            self.S, self.z = self.S[idx], self.z[idx]

    def extract(self, idx):
        out = RetentionCache()
        if not self.empty():
            out.S, out.z = self.S[idx: idx + 1], self.z[idx: idx + 1]
        out.offset = self.offset
        return out

    @property
    def state(self):
        return [self.S, self.z]

    @state.setter
    def state(self, v):
        self.S, self.z = v

    @property
    def meta_state(self):
        return str(self.offset)

    @meta_state.setter
    def meta_state(self, v):
        self.offset = int(v)

    def size(self):
        return self.offset

    def empty(self):
        return self.S is None

    @property
    def nbytes(self):
        return 0 if self.S is None else self.S.nbytes + self.z.nbytes

    def is_trimmable(self):
        return False


# ------------------------------------------------------------------ the model


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    head_dim: Optional[int] = None
    num_key_value_heads: Optional[int] = None
    tie_word_embeddings: bool = True
    retention_degree: int = 2
    retention_chunk: int = 128
    retention_gating: bool = True
    max_position_embeddings: Optional[int] = None

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        check_degree(self.retention_degree)


class Retention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        h, self.n_heads, self.n_kv_heads, self.head_dim = (args.hidden_size, args.num_attention_heads,
                                                           args.num_key_value_heads, args.head_dim)
        self.degree, self.chunk, self.scale = args.retention_degree, args.retention_chunk, args.head_dim ** -0.5
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)
        if args.retention_gating:
            self.gate_proj = nn.Linear(h, self.n_heads, bias=True)
            self.gate_proj.bias = mx.full((self.n_heads,), 3.0)  # start with long memory (decay ~0.95)

    def __call__(self, x: mx.array, mask=None, cache: Optional[RetentionCache] = None) -> mx.array:
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(B, T, self.n_heads, -1)).transpose(0, 2, 1, 3) * self.scale
        k = self.k_norm(self.k_proj(x).reshape(B, T, self.n_kv_heads, -1)).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, T, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        if self.n_kv_heads != self.n_heads:
            k, v = (mx.repeat(t, self.n_heads // self.n_kv_heads, axis=1) for t in (k, v))
        log_g = None
        if "gate_proj" in self:
            log_g = nn.log_sigmoid(self.gate_proj(x).astype(mx.float32)).transpose(0, 2, 1)
        valid = cache.valid(T) if cache is not None else None
        if valid is not None:  # right padding of a batch: no key, no decay
            k = k * valid[:, None, :, None].astype(k.dtype)
            if log_g is not None:
                log_g = mx.where(valid[:, None, :], log_g, 0.0)
        if cache is None:
            y, _ = retention_chunked(q, k, v, log_g, self.degree, self.chunk, need_state=False)
        else:
            state = None if cache.empty() else cache.state
            if T == 1 and state is not None:
                y, state = retention_recurrent(q, k, v, log_g, self.degree, state)
            else:
                y, state = retention_chunked(q, k, v, log_g, self.degree, self.chunk, state)
            cache.state = list(state)
            cache.advance(T)
        return self.o_proj(y.astype(x.dtype).transpose(0, 2, 1, 3).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x):
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Retention(args)
        self.mlp = MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x, mask=None, cache=None):
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class RetentionModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [Block(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, inputs: mx.array, cache=None, input_embeddings: Optional[mx.array] = None):
        h = input_embeddings if input_embeddings is not None else self.embed_tokens(inputs)
        for layer, c in zip(self.layers, cache or [None] * len(self.layers)):
            h = layer(h, None, c)
        return self.norm(h)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = RetentionModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache=None, input_embeddings: Optional[mx.array] = None):
        out = self.model(inputs, cache, input_embeddings)
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(out)
        return self.lm_head(out)

    def sanitize(self, weights: dict[str, Any]) -> dict[str, Any]:
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        return weights

    def make_cache(self) -> list[RetentionCache]:
        return [RetentionCache() for _ in self.layers]

    @property
    def layers(self):
        return self.model.layers
