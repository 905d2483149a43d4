"""Deterministic synthetic tasks: copy, sort, integer arithmetic, small JSON.

`copy` and `sort` are drawn in the bench suites' own formats (`mlxcore.bench.suites.sample`),
so the demo model is trained on what its bench report then measures (other questions: the
bench's are seeded apart).

Each example is a pure function of (seed, split, index), so any slice of a dataset can be
regenerated exactly, by any process, in any order. The same examples appear as plain text for
pretraining ("<prompt>\n<answer>") and as user/assistant conversations for SFT, so a model
pretrained on the text learns the skills and SFT teaches it the chat format.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

from mlxcore.bench import suites as bench_suites
from mlxcore.config import SyntheticConfig
from mlxcore.io import atomic_dir, write_manifest

_WORDS = ["ada", "bo", "cyd", "dee", "eli", "fay", "gus", "hal", "ivy", "jo", "kai", "lu"]
_CITIES = ["oslo", "lima", "rome", "kyiv", "doha", "bern", "riga", "baku", "nuuk", "apia"]


def _bench_task(suite: str) -> Callable[[random.Random], tuple[str, str]]:
    def draw(r: random.Random) -> tuple[str, str]:
        ex = bench_suites.sample(suite, r)
        return ex.prompt, ex.answer
    return draw


def _arithmetic(r: random.Random) -> tuple[str, str]:
    op = r.choice("+-*")
    a, b = r.randint(0, 99), r.randint(0, 99 if op != "*" else 12)
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return f"Compute: {a} {op} {b}", str(value)


def _json(r: random.Random) -> tuple[str, str]:
    record = {"name": r.choice(_WORDS), "age": r.randint(1, 99), "city": r.choice(_CITIES)}
    keys = r.sample(list(record), k=r.randint(2, 3))
    pairs = ", ".join(f"{k}={record[k]}" for k in keys)
    return f"JSON: {pairs}", json.dumps({k: record[k] for k in keys})


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "copy": _bench_task("copy"),
    "sort": _bench_task("sort"),
    "arithmetic": _arithmetic,
    "json": _json,
}


def example(seed: int, split: str, index: int, tasks: list[str]) -> dict:
    """One example; identical for identical (seed, split, index, tasks)."""
    r = random.Random(f"mlxflow/{seed}/{split}/{index}")
    task = tasks[r.randrange(len(tasks))]
    prompt, answer = TASKS[task](r)
    return {"task": task, "prompt": prompt, "answer": answer, "id": f"{split}-{index}"}


def pretrain_doc(seed: int, split: str, index: int, tasks: list[str]) -> str:
    """A document of 1-4 solved examples separated by blank lines."""
    r = random.Random(f"mlxflow-doc/{seed}/{split}/{index}")
    parts = [example(seed, f"{split}-doc{index}", j, tasks) for j in range(r.randint(1, 4))]
    return "\n\n".join(f"{p['prompt']}\n{p['answer']}" for p in parts)


def conversation(ex: dict) -> dict:
    return {
        "conversations": [
            {"role": "user", "content": ex["prompt"]},
            {"role": "assistant", "content": ex["answer"]},
        ],
        "meta": {"task": ex["task"], "id": ex["id"]},
    }


def _write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def write_dataset(cfg: SyntheticConfig, out_dir: str | Path) -> dict:
    """Write pretrain/{train,val}.jsonl ({"text"}) and sft/{train,val}.jsonl ({"conversations"})."""
    s, tasks = cfg.seed, list(cfg.tasks)
    sizes = {"train": (cfg.pretrain_docs, cfg.sft_examples), "val": (cfg.val_examples, cfg.val_examples)}
    with atomic_dir(out_dir) as tmp:
        for split, (n_docs, n_conv) in sizes.items():
            _write_jsonl(tmp / "pretrain" / f"{split}.jsonl", ({"text": pretrain_doc(s, split, i, tasks)} for i in range(n_docs)))
            _write_jsonl(tmp / "sft" / f"{split}.jsonl", (conversation(example(s, f"sft-{split}", i, tasks)) for i in range(n_conv)))
        return write_manifest(tmp, "raw-dataset", cfg.model_dump())
