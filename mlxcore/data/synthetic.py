"""Deterministic synthetic tasks: the seven bench suites' formats, integer arithmetic, small JSON.

`copy`, `sort`, `math_mcq`, `qa`, `logic`, `knowledge` and `json_calc` (the bench's json suite)
are drawn in the bench suites' own formats (`mlxcore.bench.suites.sample`), so the demo model is
trained on what its bench report then measures, never on the bench's own questions: those are
seeded apart, and a drawn prompt that equals one of the first `BENCH_HELD_OUT` questions of a bench
seed 0..`BENCH_HELD_OUT_SEEDS`-1 is drawn again. `knowledge` is the exception: the bench asks about a
fixed list of facts, and training on those facts is memorising them, which is what the suite measures.
`math_mcq` answers show their working before the letter ("82, so B"; the bench's scorer reads the
letter). `arithmetic` and `json` are in their own formats ("Compute: 3 + 4", "JSON: age=3, city=rome").

`tasks` is a list (a task listed twice comes twice as often) or {task: weight}; either way the
examples of a split are dealt to the tasks in exact proportion to the weights, as a weighted
mixture deals sequences to its sources (`mlxcore.data.mixture.deal`: example i goes to the task
furthest behind its share), so example i's task is a pure function of (weights, i). Each example is a pure function of (seed, tasks, split, index), so any
slice of a dataset can be regenerated exactly, by any process, in any order. The same examples
appear as plain text for pretraining ("<prompt>\n<answer>", 1-4 to a document) and as
user/assistant conversations for SFT, so a model pretrained on the text learns the skills and SFT
teaches it the chat format.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from collections import Counter
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Callable

from mlxcore.bench import suites as bench_suites
from mlxcore.config import SyntheticConfig
from mlxcore.data.mixture import deal, quotas
from mlxcore.io import atomic_dir, write_manifest

BENCH_HELD_OUT = 1000      # never train on the first 1,000 questions of a bench suite ...
BENCH_HELD_OUT_SEEDS = 4   # ... under bench seeds 0-3 (the bench asks 40 by default, seed 0)
SMALL_OPERAND = 12         # json_calc: half its examples have a factor in -12..12
BENCH_TASKS = {"copy": "copy", "sort": "sort", "math_mcq": "math_mcq", "qa": "qa", "logic": "logic",
               "knowledge": "knowledge", "json_calc": "json"}  # task -> the bench suite whose format it has

_WORDS = ["ada", "bo", "cyd", "dee", "eli", "fay", "gus", "hal", "ivy", "jo", "kai", "lu"]
_CITIES = ["oslo", "lima", "rome", "kyiv", "doha", "bern", "riga", "baku", "nuuk", "apia"]


@lru_cache(maxsize=None)
def bench_prompts(suite: str) -> frozenset[str]:
    """The bench questions training never shows (see the module docstring)."""
    return frozenset(bench_suites.example(suite, seed, i).prompt
                     for seed in range(BENCH_HELD_OUT_SEEDS) for i in range(BENCH_HELD_OUT))


def _small_operand(ex: bench_suites.Example) -> bool:
    out = json.loads(ex.answer)
    a, b = (out["sum"] + out["diff"]) // 2, (out["sum"] - out["diff"]) // 2
    return min(abs(a), abs(b)) <= SMALL_OPERAND


def draw_bench(suite: str, r: random.Random) -> bench_suites.Example:
    """A bench-format item from `r`: never one of the bench's questions (knowledge aside); for
    json, half the time one with a factor in -12..12, whose product is learnable."""
    small = suite == "json" and r.random() < 0.5
    while True:
        ex = bench_suites.sample(suite, r)
        if (suite == "knowledge" or ex.prompt not in bench_prompts(suite)) and (not small or _small_operand(ex)):
            return ex


def bench_answer(ex: bench_suites.Example, working: bool = False) -> str:
    """The training answer: the gold; math_mcq shows its sum first ("82, so B"). With `working`
    (`data.synthetic.working`), reading and logic answers show theirs in a `<think>` block:

    qa       the passage's facts about the people asked, copied: "<think> Bob is 34 years old. </think> 34"
    ordering each sentence as "taller > shorter": "<think> Emma > Carol. Carol > Alice. </think> Emma"
    boolean  reduced a level at a time: "<think> (true or false) and not false = true and true </think> true"

    Spaces around the tags keep the BPE from merging a tag into the name beside it. The bench's
    scorer drops a closed `<think>` block, so the gold is what counts."""
    if ex.suite == "math_mcq":
        return f"{ex.options[bench_suites.LETTERS.index(ex.answer)]}, so {ex.answer}"
    if working and ex.suite == "qa":
        return f"<think> {_qa_working(ex)} </think> {ex.answer}"
    if working and ex.suite == "logic":
        steps = _ordering_working(ex) if ex.category == "ordering" else _boolean_working(ex)
        return f"<think> {steps} </think> {ex.answer}" if steps else ex.answer
    return ex.answer


# How much of a person's sentence ("Bob is 34 years old, lives in Rome and works as a baker")
# each qa question needs: through the age, through the city, or all of it.
_QA_CUT = {"age": ",", "older": ",", "city": " and works", "same_city": " and works", "count": " and works", "job": None}


def _qa_working(ex: bench_suites.Example) -> str:
    passage, question = ex.prompt.split("\n")[:2]
    facts = {s.split(" ", 1)[0]: s.rstrip(".") for s in re.split(r"(?<=\.) ", passage)}
    if ex.category == "count":
        names = list(facts)  # passage order
    else:  # the people the question names, in its order
        names = [w for w in re.findall(r"[A-Z][a-z]+", question) if w in facts]
    cut = _QA_CUT[ex.category]
    return " ".join((facts[n] if cut is None else facts[n].split(cut)[0]) + "." for n in names)


_NOT = {"true": "false", "false": "true"}


def _reduce_once(expr: str) -> str:
    """One step: every `not <literal>` and every innermost `(a op b)` of literals becomes its value."""
    before = None
    while before != expr:  # "not not true" -> "true" within the step
        before = expr
        expr = re.sub(r"\bnot (true|false)\b", lambda m: _NOT[m.group(1)], expr)
    return re.sub(r"\((true|false) (and|or) (true|false)\)",
                  lambda m: str((m[1] == "true") & (m[3] == "true") if m[2] == "and"
                                else (m[1] == "true") | (m[3] == "true")).lower(), expr)


def _boolean_working(ex: bench_suites.Example) -> str:
    """The expression reduced a level at a time, "(true or false) and not false = true and true";
    empty when it is already flat ("true or false")."""
    expr, steps = ex.prompt.split("\n")[0].split(": ", 1)[1], []
    while "(" in expr or "not " in expr:
        expr = _reduce_once(expr)
        steps.append(expr)
    return " = ".join(steps)


def _ordering_working(ex: bench_suites.Example) -> str:
    pairs = []
    for taller, word, other in re.findall(r"(\w+) is (taller|shorter) than (\w+)\.", ex.prompt):
        pairs.append((taller, other) if word == "taller" else (other, taller))
    return " ".join(f"{a} > {b}." for a, b in pairs)


def _bench_task(suite: str) -> Callable[..., tuple[str, str]]:
    def draw(r: random.Random, working: bool = False) -> tuple[str, str]:
        ex = draw_bench(suite, r)
        return ex.prompt, bench_answer(ex, working)
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
    **{task: _bench_task(suite) for task, suite in BENCH_TASKS.items()},
    "arithmetic": _arithmetic,
    "json": _json,
}


def weights(tasks: Sequence[str] | Mapping[str, float]) -> dict[str, float]:
    """{task: weight}: a mapping as given, a list as counts (a task listed twice weighs 2)."""
    return dict(tasks) if isinstance(tasks, Mapping) else dict(Counter(tasks))


_DEALT: dict[tuple, list[int]] = {}


def task_of(index: int, tasks: Sequence[str] | Mapping[str, float]) -> str:
    """The task of example `index`: `mixture.deal` over the weights, from no example drawn."""
    w = weights(tasks)
    names = [k for k, v in w.items() if v > 0]
    quota = quotas([w[k] for k in names])
    dealt = _DEALT.setdefault(tuple(quota), [])
    if index >= len(dealt):  # extend the cached prefix, continuing the deal where it stopped
        counts = [dealt.count(i) for i in range(len(quota))]
        dealt += deal(quota, counts, max(index + 1 - len(dealt), 4096))
    return names[dealt[index]]


def example(seed: int, split: str, index: int, tasks: Sequence[str] | Mapping[str, float],
            working: bool = False) -> dict:
    """Example `index` of a split: its task is `task_of(index, tasks)`, its content a function of
    (seed, split, index); identical for identical arguments."""
    task = task_of(index, tasks)
    r = random.Random(f"mlxflow/{seed}/{split}/{index}")
    prompt, answer = TASKS[task](r, working) if task in BENCH_TASKS else TASKS[task](r)
    return {"task": task, "prompt": prompt, "answer": answer, "id": f"{split}-{index}"}


def bench_item(seed: int, split: str, index: int, tasks: Sequence[str] | Mapping[str, float]) -> bench_suites.Example | None:
    """The bench item behind `example(...)` (for scoring it as the bench would); None: an own-format task."""
    task = task_of(index, tasks)
    if task not in BENCH_TASKS:
        return None
    return draw_bench(BENCH_TASKS[task], random.Random(f"mlxflow/{seed}/{split}/{index}"))


def _doc_slots(seed: int, split: str, index: int) -> range:
    """Document `index`'s example slots: the documents of each block of four hold 1, 2, 3 and 4
    examples (in a seeded order), so document i starts at a slot computed in O(1) and every slot
    is used once: the examples of n documents follow the tasks' proportions exactly."""
    block, pos = divmod(index, 4)
    sizes = random.Random(f"mlxflow-doc/{seed}/{split}/{block}").sample((1, 2, 3, 4), 4)
    start = 10 * block + sum(sizes[:pos])
    return range(start, start + sizes[pos])


def pretrain_doc(seed: int, split: str, index: int, tasks: Sequence[str] | Mapping[str, float],
                 working: bool = False) -> str:
    """A document of 1-4 solved examples separated by blank lines."""
    parts = [example(seed, f"doc-{split}", j, tasks, working) for j in _doc_slots(seed, split, index)]
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
    s, tasks = cfg.seed, cfg.tasks
    sizes = {"train": (cfg.pretrain_docs, cfg.sft_examples), "val": (cfg.val_examples, cfg.val_examples)}
    with atomic_dir(out_dir) as tmp:
        for split, (n_docs, n_conv) in sizes.items():
            _write_jsonl(tmp / "pretrain" / f"{split}.jsonl", ({"text": pretrain_doc(s, split, i, tasks, cfg.working)} for i in range(n_docs)))
            _write_jsonl(tmp / "sft" / f"{split}.jsonl", (conversation(example(s, f"sft-{split}", i, tasks, cfg.working)) for i in range(n_conv)))
        return write_manifest(tmp, "raw-dataset", cfg.model_dump())
