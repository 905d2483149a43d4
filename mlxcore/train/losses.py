"""The training loss: masked token cross-entropy, computed three ways with the same value.

The loss of a batch is `(sum of per-token cross-entropies where mask > 0, mask total)`; the
trainer divides by the token count of the whole step, so every token weighs the same.

- dense (default): `model(inputs)` gives the full `[B, T, V]` logits, then cross-entropy.
- chunked (`chunk > 0`): the decoder's final hidden states `[B*T, H]` go through the output
  head `chunk` tokens at a time in a custom function whose backward pass recomputes a chunk's
  logits instead of keeping them, so only a few `[chunk, V]` blocks are ever alive, never
  `[B, T, V]` (with V = 152k and B*T = 16k that is 10 GB of float32, twice: logits and softmax).
- sparse (`sparse=True`): only positions whose mask is non-zero reach the output head. The
  positions are found on the host (`prepare`) and padded to a multiple of `pad_multiple`
  with zero-weight entries, so a compiled step sees few distinct shapes. In SFT, where the
  prompt is often most of the tokens, this skips most of the head's matmul and softmax.
  Sparse and chunked combine.

All three give the same loss and gradients up to float32 summation order (tests hold them to
1e-5 relative).

A packed SFT batch (`mlxcore.data.packing`) carries segment ids as a fourth array; the model
then runs inside `segments.packed(ids)`, so every row attends to itself only with positions
from 0, and each row's loss is its unpacked loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlxcore  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from mlxcore import kernels
from mlxcore.kernels.patch import use_segments
from mlxcore.models import segments as packing


def token_cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Per-token cross-entropy in float32: logsumexp(logits) - logits[target].

    `mlxcore.kernels.cross_entropy`: a fused kernel on the Linux CPU backend (forward and
    backward ~20x faster than MLX's ops there), plain MLX ops on every other device.
    """
    return kernels.cross_entropy(logits, targets)


def output_head(model: nn.Module) -> tuple[nn.Module, callable]:
    """(the module holding the output projection, hidden -> logits) for mlx-lm decoders."""
    head = getattr(model, "lm_head", None)
    if head is not None:
        return head, head
    embed = model.model.embed_tokens  # tied embeddings (llama, qwen2/3 small models)
    return embed, embed.as_linear


def hidden_states(model: nn.Module, inputs: mx.array) -> mx.array:
    """The decoder's output before the head (after the final norm): `[B, T, H]`."""
    return model.model(inputs)


def _head_loss(model: nn.Module, h: mx.array, targets: mx.array, weights: mx.array, chunk: int) -> mx.array:
    """sum(weights * CE(head(h), targets)) over flat `[N, H]` hidden states, in chunks if asked."""
    module, project = output_head(model)
    if not chunk or chunk >= h.shape[0]:
        return (token_cross_entropy(project(h), targets) * weights).sum()
    outer = module.trainable_parameters()
    keys = [k for k, _ in tree_flatten(outer)]

    def head(h_piece, *params):
        module.update(tree_unflatten(list(zip(keys, params))))
        return project(h_piece)

    loss = _chunked_cross_entropy(head, chunk, h.shape[0])
    total = loss(h, targets, weights, *[v for _, v in tree_flatten(outer)])
    module.update(outer)
    return total


def _pieces(n: int, chunk: int):
    return [(s, min(s + chunk, n)) for s in range(0, n, chunk)]


def _chunked_cross_entropy(head, chunk: int, n: int):
    """`f(h, targets, weights, *head_params) -> weighted CE sum` holding one chunk of logits at a time.

    A custom function: its forward sums the chunks' losses; its backward recomputes each chunk's
    logits, takes the cross-entropy's gradient (`softmax - onehot`) and pushes it through the head
    to h and the head's parameters.
    `mx.depends` chains the chunks (forward: on the running total; backward: on all of the
    previous chunk's gradients) because MLX would otherwise schedule them side by side and keep many
    chunks of logits alive at once.
    """

    @mx.custom_function
    def loss(h, targets, weights, *params):
        total = mx.array(0.0, dtype=mx.float32)
        for s, e in _pieces(n, chunk):
            logits = head(mx.depends(h[s:e], total), *params)
            total = total + (token_cross_entropy(logits, targets[s:e]) * weights[s:e]).sum()
        return total

    @loss.vjp
    def loss_vjp(primals, cotangent, _output):
        h, targets, weights, *params = primals
        d_h, d_params, previous = [], [mx.zeros_like(p) for p in params], cotangent
        for s, e in _pieces(n, chunk):
            h_piece = mx.depends(h[s:e], previous)
            logits = head(h_piece, *params)
            y = targets[s:e]
            _, (g,) = mx.vjp(lambda lg: token_cross_entropy(lg, y), [logits], [weights[s:e] * cotangent])
            _, grads = mx.vjp(head, [h_piece, *params], [g])
            d_h.append(grads[0])
            d_params = [a + b for a, b in zip(d_params, grads[1:])]
            previous = [grads[0], *d_params]  # all of this chunk's results, or its logits stay alive
        return [mx.concatenate(d_h), mx.zeros_like(targets), mx.zeros_like(weights), *d_params]

    return loss


@dataclass(frozen=True)
class Loss:
    """Callable as `loss(model, *prepare(batch)) -> (loss_sum, n_tokens)`.

    `prepare` turns a host batch `(inputs, targets, mask)` of numpy arrays into the arrays the
    loss takes: the same three when dense, `(inputs, positions, targets_at, weights)` when
    sparse; a packed batch's segment ids (a fourth host array) come last in both.
    """

    chunk: int = 0
    sparse: bool = False
    pad_multiple: int = 32

    def tokens(self, batch) -> int:
        """Positions a host batch feeds the model (padding included): what tok/s counts."""
        return batch[0].size

    def prepare(self, batch: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
        inputs, targets, mask, *segment_ids = batch
        if not self.sparse:
            return inputs, targets, mask, *segment_ids
        flat_mask = np.asarray(mask, dtype=np.float32).reshape(-1)
        where = np.flatnonzero(flat_mask)
        size = max(self.pad_multiple, -(-len(where) // self.pad_multiple) * self.pad_multiple)
        positions = np.zeros(size, dtype=np.int32)
        positions[: len(where)] = where
        weights = np.zeros(size, dtype=np.float32)
        weights[: len(where)] = flat_mask[where]
        return inputs, positions, np.asarray(targets).reshape(-1)[positions].astype(np.int32), weights, *segment_ids

    def router_weights(self, inputs: mx.array, *arrays: mx.array) -> mx.array:
        """`[B*T]` weights of the positions whose loss counts: the tokens a MoE router's statistics
        and load-balancing loss are taken over (`mlxcore.models.moe`)."""
        if not self.sparse:
            return arrays[1].reshape(-1)
        positions, weights = arrays[0], arrays[2]
        return mx.zeros((inputs.size,), dtype=mx.float32).at[positions].add((weights > 0).astype(mx.float32))

    def __call__(self, model: nn.Module, inputs: mx.array, *arrays: mx.array):
        n = 3 if self.sparse else 2  # (positions, targets, weights) or (targets, mask)
        if len(arrays) not in (n, n + 1):
            raise TypeError(f"Loss(sparse={self.sparse}) takes inputs and {n} arrays (+ segment ids), got {1 + len(arrays)}")
        segment_ids = arrays[n] if len(arrays) > n else None
        if segment_ids is not None:
            use_segments(model)
        with packing.packed(segment_ids):
            return self._sum(model, inputs, *arrays[:n])

    def _sum(self, model: nn.Module, inputs: mx.array, a: mx.array, b: mx.array, c: mx.array | None = None):
        if not self.sparse:
            targets, mask = a, b
            if not self.chunk:
                logits = model(inputs)
                return (token_cross_entropy(logits, targets) * mask).sum(), mask.sum()
            h = hidden_states(model, inputs)
            h = h.reshape(-1, h.shape[-1])
            return _head_loss(model, h, targets.reshape(-1), mask.reshape(-1), self.chunk), mask.sum()
        positions, targets, weights = a, b, c
        h = hidden_states(model, inputs)
        h = h.reshape(-1, h.shape[-1])[positions]
        return _head_loss(model, h, targets, weights, self.chunk), weights.sum()


def from_config(cfg) -> Loss:
    """The loss a `TrainConfig` asks for."""
    return Loss(chunk=cfg.loss_chunk, sparse=cfg.sparse_loss, pad_multiple=cfg.pad_multiple)
