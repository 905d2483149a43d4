"""RL reward terms: the built-ins by hand, user reward files (sync, async, registered, argument
filtering), errors that say which file / function / sample / row, and the reward-model term."""

from __future__ import annotations

import math
import textwrap

import numpy as np
import pytest

from mlxcore.config import RewardSpec, RLConfig
from mlxcore.rl.rewards import (ACCURACY_BUILTINS, BUILTINS, RewardError, Sample, Scorer, load_reward_file,
                                reward_function)


def sample(completion: str = "", *, id: str = "q1/0", where: str = "train.jsonl:12", answer=None, tokens: int = 0,
           max_tokens: int = 100, truncated: bool = False, prompt: str = "What is 6 x 7?", **reference) -> Sample:
    if answer is not None:
        reference["answer"] = answer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}]
    return Sample(id=id, where=where, prompt=prompt, messages=messages, completion=completion, reference=reference,
                  completion_tokens=tokens, truncated=truncated, max_tokens=max_tokens)


def one(name: str, s: Sample, **args) -> float:
    return BUILTINS[name](s, **args)


# ------------------------------------------------------------------------------ built-ins


def test_numeric_match_normalises_both_sides():
    gsm8k = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"
    assert one("numeric_match", sample("48 + 24 = 72 clips.\n#### 72", answer=gsm8k)) == 1.0
    assert one("numeric_match", sample("The total is $1,200.00.", answer="1200")) == 1.0
    assert one("numeric_match", sample("#### 1200", answer=1200)) == 1.0
    assert one("numeric_match", sample("#### 12.5", answer="$12.50")) == 1.0
    assert one("numeric_match", sample("#### 71", answer=gsm8k)) == 0.0
    assert one("numeric_match", sample("I restate 72 from the question and", answer="72")) == 0.0  # no stated answer
    assert ACCURACY_BUILTINS == {"numeric_match", "exact_match"}


def test_exact_match_options():
    assert one("exact_match", sample("  Paris \n", answer="paris")) == 1.0
    assert one("exact_match", sample("Paris", answer="paris"), ignore_case=False) == 0.0
    assert one("exact_match", sample("Paris.", answer="Paris")) == 0.0
    assert one("exact_match", sample("Paris.", answer="Paris"), strip_punctuation=True) == 1.0
    assert one("exact_match", sample("It is, of course,  \"New York\"!", answer="new-york"),
               strip_punctuation=True, contains=True) == 1.0
    assert one("exact_match", sample("The capital is Paris.", answer="Paris"), contains=True) == 1.0
    assert one("exact_match", sample("The capital is Lyon.", answer="Paris"), contains=True) == 0.0
    assert one("exact_match", sample("Lyon", answer=["Paris", "lyon"])) == 1.0  # any of several answers


def test_gsm8k_format_and_format():
    assert one("gsm8k_format", sample("5 + 3 = 8\n#### 8")) == 1.0
    assert one("gsm8k_format", sample("The answer is 8.")) == 0.0
    think = "<think>\nfirst\nsecond\n</think>\nThe answer is 8.\n"
    pattern = r"<think>.*</think>.*"
    assert one("format", sample(think), pattern=pattern) == 1.0  # fullmatch, DOTALL, on the stripped text
    assert one("format", sample("no think " + think), pattern=pattern) == 0.0
    assert one("format", sample("no think " + think), pattern=pattern, search=True) == 1.0
    assert one("format", sample("ANSWER: 8"), pattern=r"answer: \d+") == 0.0
    assert one("format", sample("ANSWER: 8"), pattern=r"answer: \d+", ignore_case=True) == 1.0


def test_overlong_ramp():
    # max 100, buffer 25 (the default max // 4): 0 up to 75 tokens, then down to -1 at 100
    want = {0: 0.0, 75: 0.0, 76: -1 / 25, 80: -0.2, 90: -0.6, 99: -24 / 25, 100: -1.0}
    for tokens, value in want.items():
        assert one("overlong", sample(tokens=tokens)) == pytest.approx(value), tokens
    assert one("overlong", sample(tokens=50, truncated=True)) == -1.0  # hit max_tokens: always -1
    assert one("overlong", sample(tokens=60), buffer=50) == pytest.approx(-0.2)
    assert one("overlong", sample(tokens=99), buffer=0) == 0.0


def test_length_and_repetition():
    assert one("length", sample(tokens=30)) == pytest.approx(-0.3)
    assert one("length", sample(tokens=30), target=40) == pytest.approx(-0.1)
    assert one("length", sample(tokens=50), target=40) == pytest.approx(-0.1)
    assert one("length", sample(tokens=40), target=40) == 0.0
    assert one("repetition", sample("one two three four five six")) == 0.0
    # 6 words, 4 trigrams (abc bca cab abc): 1 repeated of 4
    assert one("repetition", sample("a b c a b c")) == pytest.approx(-0.25)
    assert one("repetition", sample("A b C a B c")) == pytest.approx(-0.25)  # case-insensitive
    assert one("repetition", sample("go " * 50)) == pytest.approx(-47 / 48)  # a loop: towards -1
    assert one("repetition", sample("a b a b"), n=1) == pytest.approx(-0.5)
    assert one("repetition", sample("a b c")) == 0.0  # shorter than n + 1 words


def test_scorer_sums_weights_and_reports_accuracy():
    specs = [RewardSpec(name="gsm8k_format", weight=0.5), RewardSpec(name="numeric_match"),
             RewardSpec(name="overlong", weight=2.0), RewardSpec(name="format", args={"pattern": r".*####.*"}),
             RewardSpec(name="format", weight=-1, args={"pattern": r"^\d+$"})]
    with Scorer(specs) as scorer:
        assert scorer.keys == ["gsm8k_format", "numeric_match", "overlong", "format", "format:2"]
        assert scorer.accuracy_key == "numeric_match"
        got = scorer.score([sample("x\n#### 42", answer="42", tokens=90), sample("41", id="q1/1", answer="42")])
    assert got[0] == {"reward": pytest.approx(0.5 + 1 + 2 * -0.6 + 1), "correct": 1.0, "judge_failed": False,
                      "rewards": {"gsm8k_format": 1.0, "numeric_match": 1.0, "overlong": pytest.approx(-0.6),
                                  "format": 1.0, "format:2": 0.0}}
    assert got[1]["reward"] == -1.0 and got[1]["correct"] == 0.0
    assert Scorer([RewardSpec(name="length")]).score([sample(tokens=5)])[0]["correct"] is None  # no accuracy term
    assert Scorer([RewardSpec(name="length")]).score([]) == []


def test_builtin_errors_are_caught_at_construction_or_name_the_sample():
    with pytest.raises(RewardError, match="pattern"):
        Scorer([RewardSpec(name="format")])  # pattern is required
    with pytest.raises(RewardError, match="not a regular expression"):
        Scorer([RewardSpec(name="format", args={"pattern": "(unclosed"})])
    with pytest.raises(RewardError, match="bad args.*'nn'.*it takes: n"):
        Scorer([RewardSpec(name="repetition", args={"nn": 2})])
    with pytest.raises(RewardError, match="weight"):
        Scorer([{"name": "length", "weight": math.inf}])
    with pytest.raises(RewardError) as e:
        Scorer([RewardSpec(name="numeric_match")]).score([sample("#### 4", id="p7/3", where="data/q.jsonl:9",
                                                                 question="?")])
    msg = str(e.value)
    for part in ("built-in", "'numeric_match'", "p7/3", "data/q.jsonl:9", "no `answer` reference field", "question"):
        assert part in msg, (part, msg)


def test_unknown_name_lists_what_is_available(tmp_path):
    with pytest.raises(RewardError) as e:
        Scorer([RewardSpec(name="numeric_mach")])
    assert all(n in str(e.value) for n in [*BUILTINS, "judge", "reward_model", "no rewards_file"])
    f = tmp_path / "mine.py"
    f.write_text("def brevity(prompt, completion):\n    return 0.0\n")
    with pytest.raises(RewardError, match=r"unknown reward 'brevty'.*numeric_match.*mine\.py: brevity"):
        Scorer([RewardSpec(name="brevty")], rewards_file=f)
    with pytest.raises(RewardError, match="needs the `judge:` section"):
        Scorer([RewardSpec(name="judge")])
    with pytest.raises(RewardError, match="needs `reward_model:`"):
        Scorer([RewardSpec(name="reward_model")])
    with pytest.raises(RewardError, match="not a reward model dir"):
        Scorer([RewardSpec(name="reward_model")], reward_model=tmp_path)


# ------------------------------------------------------------------------------ reward files

USER_FILE = '''
import asyncio
import numpy as np
from helper_for_rewards import SCALE
from mlxcore.rl.rewards import reward_function

CALLS = []

def even_below_50(prompt, completion):
    CALLS.append(("even_below_50", prompt, completion))
    n = int(completion.split()[-1])
    return n % 2 == 0 and n < 50            # a bool counts as 0 / 1

def close_to(prompt, completion, answer, tolerance=0.5, **kw):
    CALLS.append(("close_to", sorted(kw)))
    return float(abs(float(completion.split()[-1]) - float(answer)) <= tolerance)

def tokens_used(completion, completion_tokens, max_tokens):   # no prompt: passed by keyword
    return np.float32(completion_tokens / max_tokens) * SCALE

def positional(p, c, id):
    CALLS.append(("positional", p, c, id))
    return len(c)

async def slow_len(prompt, completion, id):
    await asyncio.sleep(0.05)
    CALLS.append(("slow_len", id))
    return len(completion)

@reward_function(name="has-digit", accuracy=True)
def _digits(prompt, completion):
    return any(ch.isdigit() for ch in completion)

@reward_function
async def _private_but_registered(prompt, completion):
    return 1

def _helper(x):
    return x
'''


@pytest.fixture
def user_file(tmp_path):
    (tmp_path / "helper_for_rewards.py").write_text("SCALE = 10\n")  # the file's own helper module
    f = tmp_path / "my_rewards.py"
    f.write_text(USER_FILE)
    return f


def test_load_reward_file_collects_public_and_registered_functions(user_file):
    found = load_reward_file(user_file)
    assert sorted(found) == ["_private_but_registered", "close_to", "even_below_50", "has-digit", "positional",
                             "slow_len", "tokens_used"]
    # each load is a fresh module: its state does not leak between runs
    assert load_reward_file(user_file)["close_to"] is not found["close_to"]


def test_scorer_calls_user_functions_with_their_arguments_and_weights(user_file):
    specs = [RewardSpec(name="even_below_50", weight=2.0), RewardSpec(name="close_to", args={"tolerance": 1}),
             RewardSpec(name="tokens_used", weight=-0.1), RewardSpec(name="positional", weight=0.0),
             RewardSpec(name="slow_len", weight=0.01), RewardSpec(name="has-digit"),
             RewardSpec(name="_private_but_registered", weight=3)]
    scorer = Scorer(specs, rewards_file=user_file.name, base_dir=user_file.parent)  # relative to base_dir
    module = scorer.terms[0].fn.__globals__
    samples = [sample(f"it is {n}", id=f"q/{i}", answer="41", tokens=10 * (i % 3 + 1), extra_column="x")
               for i, n in enumerate([40, 42, 60] * 4)]
    got = scorer.score(samples)
    assert scorer.accuracy_key == "has-digit" and all(g["correct"] == 1.0 for g in got)
    r = got[1]["rewards"]
    assert r == {"even_below_50": 1.0, "close_to": 1.0, "tokens_used": pytest.approx(2.0), "positional": 8.0,
                 "slow_len": 8.0, "has-digit": 1.0, "_private_but_registered": 1.0}
    assert got[1]["reward"] == pytest.approx(2 + 1 - 0.2 + 0 + 0.08 + 1 + 3)
    assert [g["rewards"]["even_below_50"] for g in got[:3]] == [1.0, 1.0, 0.0]
    assert [g["rewards"]["close_to"] for g in got[:3]] == [1.0, 1.0, 0.0]
    calls = module["CALLS"]
    assert ("even_below_50", "What is 6 x 7?", "it is 40") in calls
    assert ("positional", "What is 6 x 7?", "it is 42", "q/1") in calls
    # **kw receives the other reference fields and the sample's fields, not the ones it names
    assert ("close_to", ["completion_tokens", "extra_column", "id", "max_tokens", "messages", "truncated"]) in calls
    assert sorted(c[1] for c in calls if c[0] == "slow_len") == sorted(s.id for s in samples)


def test_async_rewards_run_concurrently(tmp_path):
    f = tmp_path / "conc.py"
    f.write_text(textwrap.dedent('''
        import asyncio
        STATE = {"now": 0, "most": 0}
        async def waits(prompt, completion):
            STATE["now"] += 1
            STATE["most"] = max(STATE["most"], STATE["now"])
            await asyncio.sleep(0.1)
            STATE["now"] -= 1
            return 1.0
    '''))
    scorer = Scorer([RewardSpec(name="waits")], rewards_file=f, concurrency=8)
    import time

    start = time.perf_counter()
    got = scorer.score([sample(id=f"q/{i}") for i in range(32)])
    seconds = time.perf_counter() - start
    assert [g["reward"] for g in got] == [1.0] * 32
    assert scorer.terms[0].fn.__globals__["STATE"]["most"] == 8  # bounded by `concurrency`
    assert seconds < 2.0  # 4 rounds of 0.1 s, not 32


def test_user_args_are_checked_against_the_signature(user_file):
    with pytest.raises(RewardError, match=r"'even_below_50'.*args \['tolerence'\] are not parameters"):
        Scorer([RewardSpec(name="even_below_50", args={"tolerence": 1})], rewards_file=user_file)
    Scorer([RewardSpec(name="close_to", args={"anything": 1})], rewards_file=user_file)  # it takes **kw


@pytest.mark.parametrize("body, what", [
    ("return 1 / 0", "raised ZeroDivisionError: division by zero (at bad.py:"),
    ("return float('nan')", "returned nan"),
    ("return -math.inf", "returned -inf"),
    ("return 'abc'", "returned str 'abc', expected a number"),
    ("return None", "returned NoneType None, expected a number"),
    ("return [1.0]", "returned list [1.0], expected a number"),
])
@pytest.mark.parametrize("is_async", [False, True])
def test_a_failing_user_function_names_file_function_sample_and_row(tmp_path, body, what, is_async):
    f = tmp_path / "bad.py"
    f.write_text(f"import math\n\n{'async ' if is_async else ''}def broken(prompt, completion):\n    {body}\n")
    scorer = Scorer([RewardSpec(name="broken")], rewards_file=f)
    samples = [sample("ok", id="q3/0", where="train.jsonl:1"), sample("x", id="q3/1", where="data/train.jsonl:44")]
    with pytest.raises(RewardError) as e:
        scorer.score(samples)
    msg = str(e.value)
    for part in (str(f), "'broken'", "q3/0", "train.jsonl:1", what):
        assert part in msg, (part, msg)
    assert (e.value.file, e.value.function, e.value.sample_id, e.value.where) == \
        (str(f), "broken", "q3/0", "train.jsonl:1")
    assert isinstance(e.value, ValueError)


def test_return_values_that_are_numbers():
    scorer = Scorer([RewardSpec(name="length")])
    term = scorer.terms[0]
    for value, want in [(True, 1.0), (np.float16(0.5), 0.5), (np.int64(3), 3.0), (np.bool_(True), 1.0),
                        (np.array(2.5), 2.5), (7, 7.0)]:
        assert scorer._checked(term, sample(), value) == want


def test_a_missing_field_names_what_the_row_has(tmp_path):
    f = tmp_path / "needs.py"
    f.write_text("def needs_answer(prompt, completion, answer):\n    return 1.0\n")
    with pytest.raises(RewardError, match=r"'needs_answer'.*cannot be called with this sample's fields.*"
                                          r"missing a required argument: 'answer'.*q1/0 from train.jsonl:12"):
        Scorer([RewardSpec(name="needs_answer")], rewards_file=f).score([sample("x", other=1)])


def test_a_file_that_does_not_import_is_named(tmp_path):
    f = tmp_path / "syntax.py"
    f.write_text("def f(prompt, completion):\n    return (\n")
    with pytest.raises(RewardError, match=rf"rewards file {f} failed to import: SyntaxError"):
        Scorer([RewardSpec(name="f")], rewards_file=f)
    g = tmp_path / "raises.py"
    g.write_text("import os\nimport no_such_module_for_rewards\n")
    with pytest.raises(RewardError, match=rf"{g} failed to import: ModuleNotFoundError: .*no_such_module_for_rewards"
                                          r".*\(at raises.py:2\)"):
        load_reward_file(g)
    with pytest.raises(RewardError, match="no such file"):
        load_reward_file(tmp_path / "missing.py")
    h = tmp_path / "reserved.py"
    h.write_text("from mlxcore.rl.rewards import reward_function\n@reward_function(name='judge')\n"
                 "def j(prompt, completion):\n    return 0\n")
    with pytest.raises(RewardError, match="'judge' is reserved"):
        load_reward_file(h)


def test_reward_function_decorator_marks():
    @reward_function(name="x", accuracy=True)
    def f(prompt, completion):
        return 0

    assert f.__reward_name__ == "x" and f.__reward_accuracy__ is True and f("p", "c") == 0


def test_scorer_from_rl_config(tmp_path, user_file):
    config = RLConfig(policy=str(tmp_path), rewards_file="my_rewards.py",
                      rewards=[{"name": "numeric_match"}, {"name": "even_below_50", "weight": 0.5}])
    scorer = Scorer.from_config(config, base_dir=user_file.parent)
    [got] = scorer.score([sample("#### 42", answer="42")])
    assert got == {"reward": 1.5, "rewards": {"numeric_match": 1.0, "even_below_50": 1.0}, "correct": 1.0,
                   "judge_failed": False}


# ------------------------------------------------------------------------------ reward model


def test_reward_model_term_scores_like_reward_score(test_data, tmp_path):
    from mlxcore.data import tokenizer as tokenizers
    from mlxcore.models import checkpoint
    from mlxcore.preference import reward

    from tests.conftest import hf_model_dir

    tok_dir = test_data / "minimind_tokenizer"
    base = hf_model_dir(tmp_path / "base", tok_dir, vocab_size=6400)
    model, config = reward.from_base(base, tokenizers.load(tok_dir).pad_token_id, seed=3)
    rm_dir = checkpoint.save_model_dir(tmp_path / "rm", model, config, tokenizer_dir=tok_dir)

    samples = [sample(c, id=f"q/{i}", prompt=p) for i, (p, c) in
               enumerate([("What is 2+3?", "5"), ("What is 2+3?", "It is five, I think."), ("Name a colour.", "blue")])]
    scorer = Scorer([RewardSpec(name="reward_model", weight=2.0, args={"batch_size": 2}),
                     RewardSpec(name="length", weight=0.0)], reward_model="rm", base_dir=tmp_path)
    got = scorer.score(samples)
    want = reward.score(rm_dir, [s.messages for s in samples], [s.completion for s in samples])
    assert len(set(want)) == 3  # the scores differ
    assert [g["rewards"]["reward_model"] for g in got] == pytest.approx(want, abs=1e-5)
    assert [g["reward"] for g in got] == pytest.approx([2 * w for w in want], abs=1e-5)
    model_once = scorer._rm[0]
    scorer.score(samples[:1])
    assert scorer._rm[0] is model_once  # loaded once
    # normalize: (score - mean) / std; clip bounds it (to [-c, c], after normalizing)
    mean, std = float(np.mean(want)), float(np.std(want)) / 10
    normed = Scorer([RewardSpec(name="reward_model", args={"normalize": {"mean": mean, "std": std}})],
                    reward_model=rm_dir).score(samples)
    z = [(w - mean) / std for w in want]
    assert [g["reward"] for g in normed] == pytest.approx(z, abs=1e-3) and max(map(abs, z)) > 1.5
    clipped = Scorer([RewardSpec(name="reward_model", args={"normalize": {"mean": mean, "std": std}, "clip": 1.5})],
                     reward_model=rm_dir).score(samples)
    assert [g["reward"] for g in clipped] == pytest.approx([min(max(v, -1.5), 1.5) for v in z], abs=1e-3)
    for bad, match in (({"normalize": {"mean": 0.0}}, "normalize must be"), ({"normalize": {"mean": 0, "std": 0}},
                       "std > 0"), ({"clip": -1}, "clip must be"), ({"scale": 2}, "unknown args")):
        with pytest.raises(RewardError, match=match):
            Scorer([RewardSpec(name="reward_model", args=bad)], reward_model=rm_dir)


def test_async_rewards_also_run_from_inside_an_event_loop(tmp_path):
    import asyncio

    f = tmp_path / "inloop.py"
    f.write_text("import asyncio\nasync def later(prompt, completion):\n    await asyncio.sleep(0.01)\n"
                 "    return len(completion)\n")
    scorer = Scorer([RewardSpec(name="later")], rewards_file=f)

    async def main():  # e.g. an async flow calling the (sync) scorer
        return scorer.score([sample("abc"), sample("de", id="q/1")])

    assert [g["reward"] for g in asyncio.run(main())] == [3.0, 2.0]
