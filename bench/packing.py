"""SFT packing vs length bucketing on GSM8K: trained tokens per second, and held-out loss after the same tokens.

    python bench/packing.py                          # the README's run: seq_len 512, 4 packs a batch, `tiny`, 50k tokens a side
    python bench/packing.py --tokens 300000 --json r.json                        # longer (an hour on 2 busy cores)
    python bench/packing.py --rows 300 --val-rows 16 --packs 1 --tokens 3000 --hidden 32 --layers 1 \
        --heads 2 --kv-heads 1 --intermediate 64 --sides pack,length             # a seconds-long check

Data: GSM8K train (the first --rows rows; default all 7,473) to train on and GSM8K test (the first
--val-rows) held out, in the MiniMind tokenizer's chat template ($MLXFLOW_TEST_DATA/gsm8k and
/minimind_tokenizer, or --gsm8k / --tokenizer), pretokenized once into a temporary dir.

Each side (--sides) trains a copy of the same freshly initialised LLaMA (the `tiny` preset's
shape unless overridden) at the same seq_len, with what `fit` builds from its TrainConfig (AdamW,
warmup + cosine, clipping, the compiled step of `mlxcore.train.step`, the training `Loss`):
- pack: `pack: true`, --packs sequences of seq_len a batch (rows by best-fit decreasing, attention
  and RoPE positions per row; `mlxcore.data.packing`);
- length: `bucket: length` (the epoch cut into windows of 32 batches sorted by row length, rows
  right-padded to a multiple of 32), with as many rows a batch as feed the pack side's tokens a
  step, padding included ("same batch tokens"; measured over one epoch of its batches);
- none: no bucketing (TrainConfig's default), rows padded to the batch's longest, same rule;
- KIND@SEED: that side with the data shuffled by another seed: how far the held-out loss moves
  from a reshuffle alone, the yardstick for "the same within noise".
Each side trains until it has seen about --tokens trained (non-pad) tokens: steps = ceil(tokens /
its mean non-pad tokens a step). The sides take turns step by step (who goes first rotates), so
load from other processes on the machine falls on all of them alike. A step is timed from its batch
request to its evaluated update. Trained tokens per second: steady state = over the steps whose
batch shape had been seen before (a new shape compiles a new graph: bucketing has up to
seq_len / 32 of them, packing one); end to end = over all steps, compiles included.
Held-out loss: token-weighted over the same unpacked held-out rows for both sides, before (the
same on both: same weights, same rows) and after training.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import mlxcore  # noqa: E402  first: it loads a fast BLAS (MKL) before mlx.core binds one
import mlx.core as mx  # noqa: E402

from mlxcore import kernels  # noqa: E402
from mlxcore.config import ModelConfig, TrainConfig  # noqa: E402
from mlxcore.data import pretokenize, tokenizer as tokenizers  # noqa: E402
from mlxcore.data.loader import SFTBatches  # noqa: E402
from mlxcore.data.packing import PackedSFTBatches  # noqa: E402
from mlxcore.models.model import from_config, hf_config, num_params  # noqa: E402
from mlxcore.train import losses, optimizers  # noqa: E402
from mlxcore.train.step import make_step, mean_loss  # noqa: E402

FINAL_PREFIX = "packing / length bucketing, trained tok/s: "
KINDS = ("pack", "length", "none")
BUCKET_WINDOW, PAD_MULTIPLE, EVAL_BATCH = 32, 32, 8


def parse_args(argv=None) -> argparse.Namespace:
    data = os.environ.get("MLXFLOW_TEST_DATA")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gsm8k", type=Path, default=Path(data) / "gsm8k" if data else None,
                   help="dir with train.jsonl and test.jsonl (default $MLXFLOW_TEST_DATA/gsm8k)")
    p.add_argument("--tokenizer", type=Path, default=Path(data) / "minimind_tokenizer" if data else None,
                   help="a Hugging Face tokenizer dir (default $MLXFLOW_TEST_DATA/minimind_tokenizer)")
    p.add_argument("--rows", type=int, default=0, help="GSM8K train rows to use (0: all)")
    p.add_argument("--val-rows", type=int, default=128, help="held-out GSM8K test rows")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--packs", type=int, default=4, help="packed sequences a batch (pack side)")
    p.add_argument("--tokens", type=int, default=50_000, help="trained (non-pad) tokens a side")
    p.add_argument("--sides", default="pack,length,length@1,none",
                   help="comma-separated: pack, length (bucketing), none (no bucketing); KIND@SEED shuffles "
                        "the data with another seed (the same weights): the run-to-run noise of the held-out loss")
    shape = p.add_argument_group("model shape (mlx-lm llama; default: mlxcore's tiny preset)")
    shape.add_argument("--hidden", type=int, default=256)
    shape.add_argument("--layers", type=int, default=4)
    shape.add_argument("--heads", type=int, default=4)
    shape.add_argument("--kv-heads", type=int, default=2)
    shape.add_argument("--intermediate", type=int, default=704)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    if args.gsm8k is None or args.tokenizer is None:
        p.error("no data: set MLXFLOW_TEST_DATA or pass --gsm8k and --tokenizer")
    if min(args.val_rows, args.seq_len - 1, args.packs, args.tokens) < 1 or args.rows < 0:
        p.error("--val-rows, --packs, --tokens must be >= 1, --seq-len >= 2, --rows >= 0")
    sides = args.sides.split(",")
    if sides[:2] != ["pack", "length"] or len(set(sides)) < len(sides) or not all(
            s.partition("@")[0] in KINDS and (s.partition("@")[2] or "0").isdigit() for s in sides):
        p.error(f"--sides: pack, length, then any of {', '.join(KINDS)}, each optionally @SEED, no repeats")
    return args


def _head(path: Path, rows: int, out: Path) -> Path:
    """The first `rows` lines of a JSONL file (all of it: the file itself)."""
    if not rows:
        return path
    with open(path) as src, open(out, "w") as dst:
        for _, line in zip(range(rows), src):
            dst.write(line)
    return out


def prepare_data(args, work: Path) -> tuple[Path, dict]:
    train = _head(args.gsm8k / "train.jsonl", args.rows, work / "train.jsonl")
    val = _head(args.gsm8k / "test.jsonl", args.val_rows, work / "test.jsonl")
    pretokenize.pretokenize({"train": [train], "val": [val]}, args.tokenizer, "sft", work / "data", progress_bar=False)
    return work / "data", tokenizers.special_ids(tokenizers.load(args.tokenizer))


def epoch_stats(batches) -> dict:
    """Mean fed (padded) and trained (non-pad) tokens a batch over one epoch, and the batch shapes."""
    cursor, fed, trained, shapes = {"epoch": 0, "index": 0}, 0, 0, set()
    for _ in range(batches.batches_per_epoch):
        batch, cursor = batches.next(cursor)
        fed += batch[0].size
        trained += trained_tokens(batch, batches.pad_id)
        shapes.add(batch[0].shape)
    n = batches.batches_per_epoch
    return {"fed_per_batch": fed / n, "trained_per_batch": trained / n, "shapes": len(shapes), "batches": n}


def trained_tokens(batch, pad_id: int) -> int:
    """Positions that hold a row's token: segment id != 0 in a pack, not the pad id in a padded batch."""
    return int((batch[3] != 0).sum()) if len(batch) == 4 else int((batch[0] != pad_id).sum())


class Side:
    """One side's model, optimizer and compiled step (what `fit` builds), stepped by the caller."""

    def __init__(self, name: str, args, config: dict, batches, val):
        self.name, self.batches, self.val = name, batches, val
        kind = name.partition("@")[0]
        self.epoch = epoch_stats(batches)
        self.steps = max(2, math.ceil(args.tokens / self.epoch["trained_per_batch"]))
        self.cfg = TrainConfig(steps=self.steps, batch_size=batches.batch_size, seq_len=args.seq_len, lr=args.lr,
                               warmup_steps=max(1, self.steps // 10), seed=args.seed, pack=kind == "pack",
                               bucket="length" if kind == "length" else "none", bucket_window=BUCKET_WINDOW,
                               pad_multiple=PAD_MULTIPLE)
        self.model = from_config(config, seed=args.seed)
        self.loss = losses.from_config(self.cfg)
        self.step_fn, self.state = make_step(self.model, optimizers.build(self.cfg), self.cfg.grad_clip,
                                             self.cfg.compile, self.loss)  # also routes layers to the fused kernels
        self.initial_val_loss = mean_loss(self.model, val, self.loss)
        self.cursor, self.done, self.shapes, self.log = {"epoch": 0, "index": 0}, 0, set(), []

    def step(self) -> None:
        """One optimizer step, timed from the batch request to the evaluated update (as in `fit`)."""
        t0 = time.perf_counter()
        batch, self.cursor = self.batches.next(self.cursor)
        loss_sum, n, norm = self.step_fn([batch])
        mx.eval(self.state, loss_sum, n, norm)
        seconds = time.perf_counter() - t0
        self.log.append({"seconds": seconds, "trained": trained_tokens(batch, self.batches.pad_id),
                         "fed": int(batch[0].size), "loss_tokens": int(batch[2].sum()),
                         "new_shape": batch[0].shape not in self.shapes, "loss": loss_sum.item() / max(n.item(), 1)})
        self.shapes.add(batch[0].shape)
        self.done += 1

    def result(self) -> dict:
        steady = [s for s in self.log if not s["new_shape"]]
        steady_s, total_s = sum(s["seconds"] for s in steady), sum(s["seconds"] for s in self.log)
        trained = sum(s["trained"] for s in self.log)
        return {
            "steps": self.steps, "batch_size": self.batches.batch_size, "params": num_params(self.model),
            "epoch": self.epoch, "trained_tokens": trained, "fed_tokens": sum(s["fed"] for s in self.log),
            "loss_tokens": sum(s["loss_tokens"] for s in self.log),
            "compiled_shapes": sum(s["new_shape"] for s in self.log),
            "steady_steps": len(steady), "steady_seconds": steady_s,
            "steady_tok_per_s": sum(s["trained"] for s in steady) / steady_s if steady_s > 0 else float("nan"),
            "seconds": total_s, "end_to_end_tok_per_s": trained / total_s,
            "final_train_loss": self.log[-1]["loss"],
            "initial_val_loss": self.initial_val_loss, "val_loss": mean_loss(self.model, self.val, self.loss),
        }


def read_vocab(data_dir: Path) -> int:
    return json.loads((data_dir / "manifest.json").read_text())["vocab_size"]


def batches_for(kind: str, seed: int, args, data_dir: Path, pad: int, fed_per_step: int):
    """A side's batch source; a padded side gets as many rows a batch as feed `fed_per_step` tokens."""
    if kind == "pack":
        return PackedSFTBatches(data_dir, "train", args.packs, args.seq_len, seed=seed, pad_id=pad)
    opts = dict(seq_len=args.seq_len, seed=seed, pad_id=pad, bucket=kind, bucket_window=BUCKET_WINDOW,
                pad_multiple=PAD_MULTIPLE)
    rows = 8
    for _ in range(3):  # the padded width depends a little on the rows a batch: settle it
        width = epoch_stats(SFTBatches(data_dir, "train", rows, **opts))["fed_per_batch"] / rows
        rows = max(1, round(fed_per_step / width))
    return SFTBatches(data_dir, "train", rows, **opts)


def main(argv=None) -> dict:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="packing-bench-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        data_dir, special = prepare_data(args, work)
        pad = special["pad"] or 0
        prep_s = time.perf_counter() - t0
        mcfg = ModelConfig(preset="custom", hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                           num_kv_heads=args.kv_heads, intermediate_size=args.intermediate)
        config = hf_config(mcfg, read_vocab(data_dir), special)
        val = SFTBatches(data_dir, "val", EVAL_BATCH, args.seq_len, shuffle=False, pad_id=pad,
                         pad_multiple=PAD_MULTIPLE, shrink=True).take(math.ceil(args.val_rows / EVAL_BATCH))
        mx.random.seed(args.seed)
        sides = []
        for name in args.sides.split(","):
            kind, _, seed = name.partition("@")
            batches = batches_for(kind, int(seed) if seed else args.seed, args, data_dir, pad, args.packs * args.seq_len)
            sides.append(Side(name, args, config, batches, val))
        packed = sides[0].batches
        rounds = 0
        while any(s.done < s.steps for s in sides):  # take turns, so load from elsewhere hits every side alike
            for side in sides[rounds % len(sides):] + sides[: rounds % len(sides)]:
                if side.done < side.steps:
                    side.step()
            rounds += 1
            if rounds % 10 == 0:
                print("  " + ", ".join(f"{s.name} {s.done}/{s.steps} steps" for s in sides), file=sys.stderr, flush=True)
        results = {s.name: s.result() for s in sides}
    pack, length = results["pack"], results["length"]
    res = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "kernels": kernels.status(), "train_rows": packed.num_rows, "packs": packed.num_items,
        "pack_fill": packed.fill, "truncated_rows": packed.truncated, "prepare_s": prep_s,
        "sides": results, "pack": pack, "length": length,
        "ratio_steady": pack["steady_tok_per_s"] / length["steady_tok_per_s"],
        "ratio_end_to_end": pack["end_to_end_tok_per_s"] / length["end_to_end_tok_per_s"],
        "val_loss_diff": pack["val_loss"] - length["val_loss"],
        # pack's speed over every other side's, and what a reshuffle alone moves the held-out loss by
        "ratios_steady": {k: pack["steady_tok_per_s"] / v["steady_tok_per_s"] for k, v in results.items() if k != "pack"},
        "reshuffle_val_loss_diffs": {k: v["val_loss"] - results[k.partition("@")[0]]["val_loss"]
                                     for k, v in results.items() if "@" in k and k.partition("@")[0] in results},
    }
    report(res)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return res


def report(res: dict) -> None:
    a = res["args"]
    print(f"GSM8K SFT, {res['train_rows']} train rows, seq_len {a['seq_len']}, "
          f"{res['pack']['params'] / 1e6:.2f}M-param llama, {res['kernels']}")
    print(f"packing: {res['packs']} packs, {res['pack_fill']:.1%} of their positions are tokens "
          f"({res['truncated_rows']} rows cut to seq_len)")
    print(f"{'side':9} {'batch':>9} {'fed/step':>9} {'trained/step':>12} {'steps':>6} {'shapes':>6} "
          f"{'trained':>9} {'steady tok/s':>12} {'e2e tok/s':>10} {'val loss':>17}")
    for name, s in res["sides"].items():
        unit = "packs" if name == "pack" else "rows"
        print(f"{name:9} {s['batch_size']:>3} {unit:5} {s['epoch']['fed_per_batch']:>9.0f} "
              f"{s['epoch']['trained_per_batch']:>12.0f} {s['steps']:>6} {s['compiled_shapes']:>6} "
              f"{s['trained_tokens']:>9} {s['steady_tok_per_s']:>12.0f} {s['end_to_end_tok_per_s']:>10.0f} "
              f"{s['initial_val_loss']:>7.3f} -> {s['val_loss']:.3f}")
    for name, r in res["ratios_steady"].items():
        if name != "length":
            print(f"packing / {name}, trained tok/s: {r:.2f}x steady state")
    noise = "".join(f"; {k} vs {k.partition('@')[0]}: {d:+.3f}" for k, d in res["reshuffle_val_loss_diffs"].items())
    print(f"{FINAL_PREFIX}{res['ratio_steady']:.2f}x steady state ({res['ratio_end_to_end']:.2f}x end to end); "
          f"held-out loss {res['pack']['val_loss']:.3f} vs {res['length']['val_loss']:.3f} "
          f"(diff {res['val_loss_diff']:+.3f}{noise})")


if __name__ == "__main__":
    main()
