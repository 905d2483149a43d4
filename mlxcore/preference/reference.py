"""The reference model's log-probabilities, computed once as their own stage and read in training.

DPO, IPO, hinge and KTO compare the policy with a frozen reference (the model preference
training starts from). Its sequence log-probability of every response never changes, so it is
computed here once, in file order, and saved per split (`<out>/<split>.npy`: float32, one value
per response, in the tokenized data's row order). Training then reads two floats per pair
instead of running a second model: the reference's weights and activations are never in memory
beside the policy's, and each step runs one model instead of two. The stage is keyed on the
reference model's and the data's digests (not on beta or any other training setting), so a
second run, or a run with another beta, reuses it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import mlxcore  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx
import numpy as np

from mlxcore.data.inputs import SPLITS
from mlxcore.io import atomic_dir, dir_digest, read_manifest, write_manifest
from mlxcore.kernels.patch import use_fast_kernels
from mlxcore.models import checkpoint
from mlxcore.preference.batches import PreferenceBatches
from mlxcore.preference.losses import sequence_logprobs


def compute(model_dir: str | Path, data_dir: str | Path, out_dir: str | Path, *, seq_len: int, batch_size: int = 16,
            pad_multiple: int = 32, on_progress: Callable[[int, int], None] | None = None,
            progress_bar: bool = True) -> dict:
    """Write the reference log-probs of every response of `data_dir` under `out_dir`; its manifest."""
    data = read_manifest(data_dir, "preference")
    model, _ = checkpoint.load(model_dir)
    model.eval()
    use_fast_kernels(model)
    splits = {s: PreferenceBatches(data_dir, s, 1, seq_len, shuffle=False, pad_id=data["pad_id"],
                                   pad_multiple=pad_multiple) for s in SPLITS}
    total = sum(b.num_items for b in splits.values())
    bar = None
    if progress_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="reference log-probs", unit="ex", file=sys.stderr, mininterval=1.0)
    done = 0
    try:
        with atomic_dir(out_dir) as tmp:
            for split, batches in splits.items():
                out = []
                for batch in batches.in_order(batch_size):
                    logp, _ = sequence_logprobs(model, *(mx.array(batch[k]) for k in ("inputs", "targets", "mask")))
                    mx.eval(logp)
                    out.append(np.array(logp, dtype=np.float32))
                    done += len(batch["target"])
                    if bar is not None:
                        bar.update(len(batch["target"]))
                    if on_progress is not None:
                        on_progress(done, total)
                np.save(tmp / f"{split}.npy", np.concatenate(out))
            config = {"model": dir_digest(model_dir), "data": data["digest"], "seq_len": seq_len}
            return write_manifest(tmp, "reference", config, model=str(model_dir), examples={s: b.num_items for s, b in splits.items()})
    finally:
        if bar is not None:
            bar.close()


def load(reference_dir: str | Path, split: str, data_dir: str | Path | None = None) -> np.ndarray:
    """One split's reference log-probs; given `data_dir`, only if they were computed on that data
    (its digest: a count check alone passes other data of the same size)."""
    manifest = read_manifest(reference_dir, "reference")
    if data_dir is not None and manifest["config"]["data"] != read_manifest(data_dir, "preference")["digest"]:
        raise ValueError(f"{reference_dir}: the reference log-probs were computed on other data than {data_dir}")
    return np.load(Path(reference_dir) / f"{split}.npy")
