"""Synthetic preference data from the bench's own generators: chosen is right, rejected a near miss.

Each example is a pure function of (seed, split, index): a question drawn in the bench suites'
formats (`sort`, `copy`; `arithmetic` as in the synthetic SFT data), its right answer as
`chosen`, and a wrong answer that looks like a model's mistake as `rejected` (sort: one number
miscounted, copied from its neighbour, or two neighbours swapped; copy: one letter changed; arithmetic: off by a small
amount). So a model SFT'd on the demo's tasks has something to learn from the pairs and the
bench can measure it. `rows` writes the same examples as KTO rows (each side labelled) or as
scored rows (reward 1 / 0) for the other objectives and for reward models.

Written as a raw dataset (`preference/{train,val}.jsonl` + manifest), the layout pretokenize
reads.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

from mlxcore.bench import suites as bench_suites
from mlxcore.config import SyntheticPairsConfig
from mlxcore.io import atomic_dir, write_manifest


def _wrong_sort(answer: str, r: random.Random) -> str:
    """A small model's typical sort mistakes: mostly the sorted list with one number miscounted
    (copied from its neighbour, so it still looks sorted), sometimes two neighbours swapped."""
    nums = answer.split()
    spots = [i for i in range(len(nums) - 1) if nums[i] != nums[i + 1]]
    if not spots:  # all equal: drop one
        return " ".join(nums[:-1])
    i = r.choice(spots)
    if r.random() < 0.75:
        if r.random() < 0.5:
            nums[i] = nums[i + 1]
        else:
            nums[i + 1] = nums[i]
    else:
        nums[i], nums[i + 1] = nums[i + 1], nums[i]
    return " ".join(nums)


def _wrong_copy(answer: str, r: random.Random) -> str:
    i = r.randrange(len(answer))
    return answer[:i] + r.choice([c for c in string.ascii_lowercase if c != answer[i]]) + answer[i + 1:]


def _arithmetic(r: random.Random) -> tuple[str, str, str]:
    op = r.choice("+-*")
    a, b = r.randint(0, 99), r.randint(0, 99 if op != "*" else 12)
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return f"Compute: {a} {op} {b}", str(value), str(value + r.choice([-2, -1, 1, 2, 10, -10]))


def example(seed: int, split: str, index: int, tasks: list[str]) -> dict:
    """{"task", "prompt", "chosen", "rejected", "id"}: identical for identical arguments."""
    r = random.Random(f"mlxflow-pairs/{seed}/{split}/{index}")
    task = tasks[r.randrange(len(tasks))]
    if task == "arithmetic":
        prompt, chosen, rejected = _arithmetic(r)
    else:
        ex = bench_suites.sample(task, r)
        prompt, chosen = ex.prompt, ex.answer
        rejected = _wrong_sort(chosen, r) if task == "sort" else _wrong_copy(chosen, r)
    return {"task": task, "prompt": prompt, "chosen": chosen, "rejected": rejected, "id": f"{split}-{index}"}


def rows(ex: dict, kind: str) -> list[dict]:
    if kind == "pairs":
        return [{"prompt": ex["prompt"], "chosen": ex["chosen"], "rejected": ex["rejected"], "id": ex["id"]}]
    if kind == "kto":
        return [{"prompt": ex["prompt"], "completion": ex["chosen"], "label": True, "id": ex["id"] + "-c"},
                {"prompt": ex["prompt"], "completion": ex["rejected"], "label": False, "id": ex["id"] + "-r"}]
    return [{"prompt": ex["prompt"], "response": ex["chosen"], "reward": 1.0, "id": ex["id"] + "-c"},
            {"prompt": ex["prompt"], "response": ex["rejected"], "reward": 0.0, "id": ex["id"] + "-r"}]


def write_dataset(cfg: SyntheticPairsConfig, out_dir: str | Path) -> dict:
    """Write preference/{train,val}.jsonl under `out_dir` (atomically) and a raw-dataset manifest."""
    tasks = list(cfg.tasks)
    with atomic_dir(out_dir) as tmp:
        (tmp / "preference").mkdir()
        for split, n in (("train", cfg.train_examples), ("val", cfg.val_examples)):
            with open(tmp / "preference" / f"{split}.jsonl", "w") as f:
                for i in range(n):
                    for row in rows(example(cfg.seed, split, i, tasks), cfg.rows):
                        f.write(json.dumps(row) + "\n")
        return write_manifest(tmp, "raw-dataset", cfg.model_dump())
