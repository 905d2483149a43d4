"""The synthetic task mixture: exact weighted proportions, determinism, and the bench-format tasks
(each scored correct by the bench's own scorer, none of them one of the bench's questions)."""

import random
from collections import Counter

import pytest

from mlxcore.bench import scoring, suites
from mlxcore.config import ConfigError, SyntheticConfig, load_config
from mlxcore.data import synthetic

def test_weighted_tasks_come_in_exact_proportions_and_deterministically():
    weights = {"qa": 3, "copy": 2, "json_calc": 0.5, "sort": 0}
    tasks = [synthetic.task_of(i, weights) for i in range(1100)]
    assert Counter(tasks[:110]) == {"qa": 60, "copy": 40, "json_calc": 10}  # a period: 11 slots of 2 = 6 + 4 + 1
    assert Counter(tasks) == {"qa": 600, "copy": 400, "json_calc": 100}
    for n in range(1, 200):  # every prefix within one example of its share
        got = Counter(tasks[:n])
        assert all(abs(got[k] - n * w / 5.5) < 1 for k, w in weights.items())
    # a pure function of (weights, index): any order, any process, a list = its counts
    assert [synthetic.task_of(i, weights) for i in reversed(range(1100))] == tasks[::-1]
    assert [synthetic.task_of(i, ["copy", "sort", "copy"]) for i in range(30)] == \
        [synthetic.task_of(i, {"copy": 2, "sort": 1}) for i in range(30)]
    assert synthetic.example(3, "s", 17, weights) == synthetic.example(3, "s", 17, dict(weights))


def test_pretrain_documents_use_every_example_slot_once(tmp_path):
    cfg = SyntheticConfig(tasks={"copy": 1, "knowledge": 1, "logic": 3}, pretrain_docs=40, sft_examples=25,
                          val_examples=8)
    tmp_path = tmp_path / "raw"
    synthetic.write_dataset(cfg, tmp_path)
    slots = [j for i in range(40) for j in synthetic._doc_slots(0, "train", i)]
    assert slots == list(range(100))  # 10 blocks of 1 + 2 + 3 + 4 examples
    docs = [line for line in (tmp_path / "pretrain/train.jsonl").read_text().splitlines()]
    assert len(docs) == 40 and sum(d.count("\\n\\n") + 1 for d in docs) == 100
    sft = [line for line in (tmp_path / "sft/train.jsonl").read_text().splitlines()]
    assert Counter('"task": "logic"' in row for row in sft)[True] == 15


@pytest.mark.parametrize("task", sorted(synthetic.BENCH_TASKS))
def test_bench_format_tasks_are_right_by_the_bench_scorer_and_never_its_questions(task):
    suite = synthetic.BENCH_TASKS[task]
    asked = {ex.prompt for ex in suites.make(suite, 100, seed=0)}
    seen_categories = set()
    for i in range(150):
        ex = synthetic.example(0, "t", i, [task])
        item = synthetic.bench_item(0, "t", i, [task])
        assert (item.suite, item.prompt) == (suite, ex["prompt"])
        seen_categories.add(item.category)
        assert scoring.score(item, ex["answer"]).correct, (task, ex)
        assert scoring.score(item, suites.baseline(item, random.Random(i))).valid
        if suite != "knowledge":  # knowledge asks about a fixed list of facts: training on them is the point
            assert ex["prompt"] not in asked
    assert seen_categories == set(suites.CATEGORIES[suite])
    if task == "json_calc":  # half of them with a factor in -12..12
        small = sum(synthetic._small_operand(synthetic.bench_item(0, "t", i, [task])) for i in range(150))
        assert 75 <= small <= 75 + 0.31 * 75 + 15


def test_tasks_take_a_list_or_weights():
    assert SyntheticConfig(tasks=["copy", "sort"]).tasks == ["copy", "sort"]
    assert SyntheticConfig(tasks={"qa": 2, "logic": 0.5}).tasks == {"qa": 2.0, "logic": 0.5}
    assert load_config(None, ["data.synthetic.tasks={qa: 1, knowledge: 3}"]).data.synthetic.tasks == \
        {"qa": 1.0, "knowledge": 3.0}
    for bad in ("{qa: 0}", "{qa: -1, copy: 1}", "[]", "{nope: 1}"):
        with pytest.raises(ConfigError):
            load_config(None, [f"data.synthetic.tasks={bad}"])


def _bool_value(expr: str) -> bool:
    """Python's own reading of the bench's expressions (`not` binds tighter than `and` / `or`, as generated)."""
    return eval(expr.replace("true", "True").replace("false", "False"))  # noqa: S307 (our own generated text)


def test_the_working_before_an_answer_is_faithful_to_the_question(tmp_path):
    """What the demo learns to write inside <think>: the facts it copies are the passage's, each boolean
    reduction keeps the expression's value, an ordering's pairs single out the answer."""
    for i in range(200):
        qa = suites.sample("qa", random.Random(f"qa{i}"))
        assert synthetic.bench_answer(qa) == qa.answer  # the working is opt-in (data.synthetic.working)
        working = synthetic.bench_answer(qa, working=True).split("<think> ")[1].split(" </think>")[0]
        for fact in working.split(". "):
            assert fact.rstrip(".") in qa.prompt, (qa.prompt, working)
        logic = suites.sample("logic", random.Random(f"logic{i}"))
        answer = synthetic.bench_answer(logic, working=True)
        if logic.category == "boolean" and "<think>" in answer:
            expr = logic.prompt.split("\n")[0].split(": ", 1)[1]
            steps = answer.split("<think> ")[1].split(" </think>")[0].split(" = ")
            assert all(_bool_value(s) == _bool_value(expr) for s in steps) and "(" not in steps[-1]
            assert answer.endswith(" " + logic.answer)
        elif logic.category == "ordering":
            pairs = answer.split("<think> ")[1].split(" </think>")[0].rstrip(".").split(". ")
            taller = {a for a, _ in (p.split(" > ") for p in pairs)}
            shorter = {b for _, b in (p.split(" > ") for p in pairs)}
            assert logic.answer in (taller - shorter if "tallest" in logic.prompt else shorter - taller)
    # data.synthetic.working reaches the written data (pretraining text and SFT answers), only there
    cfg = SyntheticConfig(tasks={"qa": 1}, pretrain_docs=4, sft_examples=4, val_examples=4, working=True)
    synthetic.write_dataset(cfg, tmp_path / "on")
    synthetic.write_dataset(cfg.model_copy(update={"working": False}), tmp_path / "off")
    for split in ("pretrain/train.jsonl", "sft/train.jsonl"):
        assert "<think> " in (tmp_path / "on" / split).read_text()
        assert "<think>" not in (tmp_path / "off" / split).read_text()
