"""RL rewards: GSM8K answer checking, built-in reward functions, user reward files and the `Scorer`
that turns `RLConfig.rewards` into one number per sampled completion.

GSM8K helpers (small pure functions, as before):

`extract_answer(text)`: the number after the last `#### ` line, else the final answer the
response states by the distill checker's rule (`mlxcore.bench.answers.final_number`: an
`Answer:` line or `\\boxed{}`, else a concluding final statement such as "So she has 12 left." or
"3 x 4 = 12"), normalised: thousands commas, a currency sign, a trailing full stop or `%` and zero
decimals go ("$1,234.00" -> "1234", "-3", "12.5", "3/4" -> "0.75"). None when the response states
no final answer: there is no "last number anywhere" fallback, so a response that restates the
question (its numbers, even the right one) earns no correctness reward.
`gsm8k_truth(answer)`: the same applied to a GSM8K `answer` field (its `#### n` line).
`correctness_reward`: 1.0 when the two are equal, else 0.0.
`format_reward`: 1.0 when the response ends with a `#### <number>` line (optionally followed by
the end-of-turn text only), the format GSM8K's worked answers use.
`reward(response, truth, format_weight)`: correctness + format_weight x format (the old fixed reward).

The reward of a sample (`Sample`: one completion of one prompt, with its source row's reference
fields) is the weighted sum of the terms of `RLConfig.rewards` (`RewardSpec`: name, weight, args):

  built-ins (`BUILTINS`, each `fn(sample, **args) -> float`)
    numeric_match  1.0 when extract_answer(completion) equals the row's `answer` normalised by the
                   same rules (a GSM8K answer "... #### 72", "72", "$1,200" or 72), else 0.0.
                   The GSM8K correctness reward. An accuracy term.
    exact_match    1.0 when the stripped completion equals the row's `answer` (a list: any of them),
                   else 0.0. args: ignore_case (True), strip_punctuation (False: True drops
                   punctuation and collapses whitespace on both sides), contains (False: True
                   asks only that the answer occur in the completion). An accuracy term.
    gsm8k_format   1.0 when the completion ends with a '#### <number>' line (format_reward).
    format         1.0 when the stripped completion matches the regex `pattern` (required):
                   re.fullmatch with DOTALL; args search (False: True uses re.search),
                   ignore_case (False).
    overlong       DAPO's soft overlong penalty: 0 up to max_tokens - buffer completion tokens,
                   then linearly down to -1 at max_tokens; -1 when truncated (hit max_tokens).
                   args: buffer (max_tokens // 4).
    length         -(completion_tokens / max_tokens), in [-1, 0]; with arg `target` (tokens):
                   -|completion_tokens - target| / max_tokens, 0 at the target length.
    repetition     minus the fraction of repeated word n-grams of the completion (lower-cased
                   words split on white space; (n-grams - distinct n-grams) / n-grams), so 0 when
                   nothing repeats and towards -1 for a loop; 0 when the completion has fewer
                   than n + 1 words. args: n (3).
  functions of `rewards_file` (see below); a file's function shadows a built-in of its name.
  judge            the LLM judge (`mlxcore.rl.judge`, configured by `RLConfig.judge`): score / max_score.
                   A sample the judge could not score gets None (and so does its total reward).
  reward_model     the learned reward model of `RLConfig.reward_model` (mlxcore.preference.reward):
                   its score of (prompt messages, completion). args: batch_size (16); normalize
                   ({mean, std}: the score becomes (score - mean) / std, e.g. the model's statistics
                   on the starting policy's samples, so the reward, the KL coefficient and a PPO
                   critic's value clipping work on a unit scale whatever the model's logit scale);
                   clip (c > 0: the (normalized) score is clipped to [-c, c], so samples far outside
                   what the model was trained on cannot earn unbounded reward).

A name may appear twice (e.g. two `format` patterns): the second term's key in `rewards` is
"format:2", the third "format:3", and so on.

The iteration's accuracy (`correct`) is the value of the first accuracy term (numeric_match,
exact_match, or a file function registered with `@reward_function(accuracy=True)`); None without one.

A rewards file is plain Python; every public top-level function defined in it is a reward name,
and `@reward_function(name=...)` registers one under another name (or marks it an accuracy term):

    # rewards.py (RLConfig: rewards_file: rewards.py, rewards: [{name: even_below_50}, ...])
    import re
    from mlxcore.rl.rewards import reward_function

    def even_below_50(prompt, completion):            # only what it names is passed
        n = re.findall(r"-?\\d+", completion)
        return float(bool(n) and int(n[-1]) % 2 == 0 and int(n[-1]) < 50)

    def close_to(prompt, completion, answer, tolerance=0.5, **fields):  # args: {tolerance: 1}
        ...

    @reward_function(name="polite", accuracy=False)
    async def _ask_my_service(prompt, completion, id):  # awaited; many samples run concurrently
        ...

    def _helper(x):                                    # private: not a reward
        ...

A file function is called as `fn(prompt, completion, **fields)`. `prompt` is the last user
message's text; fields are the row's reference fields (e.g. `answer` and any other column), then
`messages` (the prompt messages), `completion_tokens`, `truncated`, `max_tokens` and `id` (the
sample's "<prompt id>/<index>"), then the term's `args` (later ones win on a clash). Only the
keyword arguments its signature names are passed (all of them when it takes **kwargs). When the
signature names a `prompt` or `completion` parameter they are passed by keyword, otherwise as
the first two positional arguments (`def f(p, c)` works). `async def` functions are awaited, up
to `concurrency` (32) calls at once. The file's directory is put on sys.path, so it can import
its own helper modules. A return value must be a real number (bool, int, float, numpy scalar);
anything else, NaN or inf, or an exception, raises `RewardError` naming the file, the function,
the sample id and its source row.

This module imports neither mlx nor mlxcore.rl.loop (the reward model and the judge load lazily).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import importlib.util
import inspect
import itertools
import math
import numbers
import re
import string
import sys
import threading
import traceback
import unicodedata
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from mlxcore.bench.answers import final_number, number_from_candidate

_HASHES = re.compile(r"^[ \t]*####[ \t]*(?P<rest>[^\n]*)$", re.M)
_FORMAT = re.compile(r"####[ \t]*[-+$]?[\d,]*\.?\d+[ \t]*\.?\s*\Z")


# ------------------------------------------------------------------------------ GSM8K helpers


def extract_answer(text: str) -> str | None:
    """The response's final answer, normalised; None when it states none."""
    if not text:
        return None
    marked = _HASHES.findall(text)
    if marked:
        found = number_from_candidate(marked[-1].strip())
        if found is not None:
            return found
    return final_number(text)


def gsm8k_truth(answer: str) -> str:
    """The normalised final number of a GSM8K `answer` field (`... #### 72`)."""
    truth = extract_answer(answer)
    if truth is None:
        raise ValueError(f"no final number in GSM8K answer {answer[-80:]!r}")
    return truth


def correctness_reward(response: str, truth: str) -> float:
    return 1.0 if extract_answer(response) == truth else 0.0


def format_reward(response: str) -> float:
    return 1.0 if _FORMAT.search(response.strip()) else 0.0


def reward(response: str, truth: str, format_weight: float = 0.0) -> float:
    """Correctness (0/1) plus `format_weight` x the format reward."""
    return correctness_reward(response, truth) + format_weight * format_reward(response)


# ------------------------------------------------------------------------------ samples, errors


@dataclass
class Sample:
    """One sampled completion of one prompt, as the rewards see it."""

    id: str                                  # "<prompt id>/<sample index>"
    where: str                               # the source row, "train.jsonl:12"
    prompt: str                              # the last user message's text
    messages: list[dict]                     # the prompt messages (system, user, ...)
    completion: str
    reference: dict[str, Any] = field(default_factory=dict)  # the row's reference fields: {"answer": ..., ...}
    completion_tokens: int = 0
    truncated: bool = False                  # generation hit max_tokens
    max_tokens: int = 0


class RewardError(ValueError):
    """A reward function failed on a sample, or a reward configuration is wrong. For a failure on
    a sample, `file` ("built-in" for built-ins), `function`, `sample_id` and `where` say which."""

    def __init__(self, message: str, *, file: str | None = None, function: str | None = None,
                 sample_id: str | None = None, where: str | None = None) -> None:
        super().__init__(message)
        self.file, self.function, self.sample_id, self.where = file, function, sample_id, where


BUILTIN = "built-in"
ACCURACY_ATTR = "__reward_accuracy__"
NAME_ATTR = "__reward_name__"


def reward_function(name: str | Callable | None = None, *, accuracy: bool = False):
    """Mark a function of a rewards file as a reward named `name` (default: its own name), also
    when that name is private or the function comes from a helper module; `accuracy=True` makes it
    an accuracy term (the iteration's `accuracy` metric). Usable bare (`@reward_function`) too."""
    def mark(fn: Callable) -> Callable:
        if not callable(fn):
            raise TypeError(f"reward_function: {fn!r} is not callable")
        reward_name = name if isinstance(name, str) else getattr(fn, "__name__", None)
        if not reward_name:
            raise TypeError(f"reward_function: name the reward of {fn!r} (it has no __name__)")
        setattr(fn, NAME_ATTR, reward_name)
        setattr(fn, ACCURACY_ATTR, bool(accuracy))
        return fn
    if callable(name) and not isinstance(name, str):
        return mark(name)
    return mark


# ------------------------------------------------------------------------------ built-ins


def _answer(sample: Sample, reward_name: str) -> Any:
    if "answer" not in sample.reference or sample.reference["answer"] is None:
        have = ", ".join(sorted(sample.reference)) or "none"
        raise LookupError(f"the row has no `answer` reference field ({reward_name} compares with it; its reference "
                          f"fields: {have}; map a column with data.columns: {{answer: <column>}})")
    return sample.reference["answer"]


@lru_cache(maxsize=65536)
def _reference_number(answer: str) -> str | None:
    return extract_answer(answer) or number_from_candidate(answer)


def numeric_match(sample: Sample) -> float:
    answer = _answer(sample, "numeric_match")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise TypeError(f"reference answer {answer!r} is a {type(answer).__name__}, not a number or text")
    truth = _reference_number(answer if isinstance(answer, str) else repr(answer))
    if truth is None:
        raise ValueError(f"reference answer {str(answer)[-80:]!r} states no number")
    return 1.0 if extract_answer(sample.completion) == truth else 0.0


def _drop_punctuation(text: str) -> str:
    return " ".join("".join(" " if c in string.punctuation or unicodedata.category(c).startswith("P") else c
                            for c in text).split())


def _norm_text(text: str, ignore_case: bool, strip_punctuation: bool) -> str:
    text = text.strip()
    if strip_punctuation:
        text = _drop_punctuation(text)
    return text.casefold() if ignore_case else text


def exact_match(sample: Sample, ignore_case: bool = True, strip_punctuation: bool = False,
                contains: bool = False) -> float:
    answer = _answer(sample, "exact_match")
    answers = answer if isinstance(answer, (list, tuple)) else [answer]
    got = _norm_text(sample.completion, ignore_case, strip_punctuation)
    for a in answers:
        want = _norm_text(str(a), ignore_case, strip_punctuation)
        if (want in got) if contains else (got == want):
            return 1.0
    return 0.0


def gsm8k_format(sample: Sample) -> float:
    return format_reward(sample.completion)


def format_match(sample: Sample, pattern: str, search: bool = False, ignore_case: bool = False) -> float:
    flags = re.DOTALL | (re.IGNORECASE if ignore_case else 0)
    rx = re.compile(pattern, flags)
    text = sample.completion.strip()
    return 1.0 if (rx.search(text) if search else rx.fullmatch(text)) else 0.0


def overlong(sample: Sample, buffer: int | None = None) -> float:
    max_tokens, n = sample.max_tokens, sample.completion_tokens
    if sample.truncated:
        return -1.0
    if max_tokens <= 0:
        raise ValueError(f"overlong needs the sample's max_tokens (got {max_tokens})")
    if n >= max_tokens:
        return -1.0
    buffer = max_tokens // 4 if buffer is None else buffer
    start = max_tokens - buffer
    if buffer <= 0 or n <= start:
        return 0.0
    return -(n - start) / buffer


def length(sample: Sample, target: int | None = None) -> float:
    if sample.max_tokens <= 0:
        raise ValueError(f"length needs the sample's max_tokens (got {sample.max_tokens})")
    if target is None:
        return -sample.completion_tokens / sample.max_tokens
    return -abs(sample.completion_tokens - target) / sample.max_tokens


def repetition(sample: Sample, n: int = 3) -> float:
    words = sample.completion.lower().split()
    if len(words) < n + 1:
        return 0.0
    grams = [tuple(words[i: i + n]) for i in range(len(words) - n + 1)]
    return -(len(grams) - len(set(grams))) / len(grams)


def _check_format(args: dict) -> None:
    try:
        re.compile(args["pattern"])
    except (re.error, TypeError) as e:
        raise ValueError(f"pattern {args['pattern']!r} is not a regular expression: {e}") from None


def _check_positive_int(key: str, minimum: int) -> Callable[[dict], None]:
    def check(args: dict) -> None:
        v = args.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < minimum):
            raise ValueError(f"{key} must be an integer >= {minimum}, got {v!r}")
    return check


BUILTINS: dict[str, Callable[..., float]] = {
    "numeric_match": numeric_match,
    "exact_match": exact_match,
    "gsm8k_format": gsm8k_format,
    "format": format_match,
    "overlong": overlong,
    "length": length,
    "repetition": repetition,
}
ACCURACY_BUILTINS = frozenset({"numeric_match", "exact_match"})
_ARG_CHECKS: dict[str, Callable[[dict], None]] = {
    "format": _check_format,
    "overlong": _check_positive_int("buffer", 0),
    "length": _check_positive_int("target", 0),
    "repetition": _check_positive_int("n", 1),
}
SPECIAL = ("judge", "reward_model")


# ------------------------------------------------------------------------------ reward files

_loaded = itertools.count()


def load_reward_file(path: str | Path) -> dict[str, Callable[..., Any]]:
    """The reward functions of a Python file: {reward name: function} (see the module doc).

    Raises RewardError naming the file when it is missing or fails to import."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise RewardError(f"rewards file {path}: no such file", file=str(path))
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    stem = re.sub(r"\W", "_", path.stem)
    module_name = f"mlxflow_rewards_{stem}_{digest}_{next(_loaded)}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise RewardError(f"rewards file {path}: cannot be imported as Python (name it *.py)", file=str(path))
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)  # its own helper modules; kept for imports made when a reward runs
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as e:
        sys.modules.pop(module_name, None)
        raise RewardError(f"rewards file {path} failed to import: {_describe(e, str(path))}", file=str(path)) from e
    found: dict[str, Callable[..., Any]] = {}
    for attr, obj in vars(module).items():
        marked = getattr(obj, NAME_ATTR, None) if callable(obj) else None
        if isinstance(marked, str):
            if marked in found and found[marked] is not obj:
                raise RewardError(f"rewards file {path}: two functions are registered as reward {marked!r}",
                                  file=str(path))
            found[marked] = obj
        elif (inspect.isfunction(obj) and obj.__module__ == module_name and not attr.startswith("_")
              and attr not in found):
            found[attr] = obj
    for reserved in SPECIAL:
        if reserved in found and getattr(found[reserved], NAME_ATTR, None) == reserved:
            raise RewardError(f"rewards file {path}: {reserved!r} is reserved (the built-in {reserved} term); "
                              "register the function under another name", file=str(path))
        found.pop(reserved, None)
    return found


def _describe(e: BaseException, file: str | None = None) -> str:
    """'ExcType: message', with the deepest line of `file` the traceback passed through."""
    text = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    if file is not None and not isinstance(e, SyntaxError):
        lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == file]
        if lines:
            text += f" (at {Path(file).name}:{lines[-1]})"
    return text


# ------------------------------------------------------------------------------ calling


def _as_number(value: Any) -> tuple[float | None, str | None]:
    """(the value as a float, None) or (None, what is wrong with it)."""
    if isinstance(value, bool):
        return float(value), None
    if isinstance(value, numbers.Real):
        x = float(value)
    elif type(value).__name__ == "bool_" and hasattr(value, "item"):  # numpy.bool_
        return float(bool(value)), None
    elif getattr(value, "shape", None) == () and hasattr(value, "item") and isinstance(value.item(), (bool, numbers.Real)):
        x = float(value.item())  # a 0-d numpy / mlx array
    else:
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        return None, f"returned {type(value).__name__} {shown}, expected a number"
    if not math.isfinite(x):
        return None, f"returned {x}"
    return x, None


@dataclass
class _Term:
    key: str                      # its key in `rewards` ("format", "format:2")
    name: str                     # the reward name
    weight: float
    args: dict[str, Any]
    kind: str                     # "builtin" | "user" | "judge" | "reward_model"
    fn: Callable[..., Any] | None = None
    file: str = BUILTIN
    accuracy: bool = False
    sig: inspect.Signature | None = None
    by_keyword: bool = False      # pass prompt/completion by keyword
    accepts: frozenset[str] | None = None  # keyword names its signature takes; None: **kwargs

    def fail(self, sample: Sample, what: str) -> RewardError:
        term = f"reward term {self.key!r}: " if self.key != self.name else ""
        return RewardError(f"{term}reward function {self.name!r} ({self.file}) {what} on sample {sample.id} "
                           f"from {sample.where}", file=self.file, function=self.name, sample_id=sample.id,
                           where=sample.where)


def _signature(fn: Callable, what: str) -> inspect.Signature:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError) as e:
        raise RewardError(f"{what}: cannot read its signature ({e})") from None


def _user_term(term: _Term) -> None:
    """Work out how to call a file function; check `args` against its signature."""
    fn = term.fn
    what = f"reward function {term.name!r} ({term.file})"
    sig = term.sig = _signature(fn, what)
    params = list(sig.parameters.values())
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    term.by_keyword = bool({"prompt", "completion"} & named)
    if term.by_keyword:
        term.accepts = None if var_kw else frozenset(named)
    else:
        try:
            sig.bind_partial("prompt", "completion")
        except TypeError as e:
            raise RewardError(f"{what}: must take (prompt, completion, ...): {e}", file=term.file,
                              function=term.name) from None
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][:2]
        term.accepts = None if var_kw else frozenset(named - {p.name for p in positional})
    unknown = sorted(set(term.args) - term.accepts) if term.accepts is not None else []
    if unknown:
        raise RewardError(f"{what}: args {unknown} are not parameters of it (it takes: "
                          f"{', '.join(sorted(term.accepts)) or 'no keyword arguments'})", file=term.file,
                          function=term.name)
    term.accuracy = bool(getattr(fn, ACCURACY_ATTR, False))


def _call_user(term: _Term, sample: Sample) -> Any:
    """Call a file function on a sample: its value, or a coroutine for an async one."""
    fields = {k: v for k, v in sample.reference.items() if k not in ("prompt", "completion")}
    fields |= {"messages": sample.messages, "completion_tokens": sample.completion_tokens,
               "truncated": sample.truncated, "max_tokens": sample.max_tokens, "id": sample.id}
    fields |= term.args
    args: tuple = ()
    if term.by_keyword:
        fields = {"prompt": sample.prompt, "completion": sample.completion} | fields
    else:
        args = (sample.prompt, sample.completion)
    if term.accepts is not None:
        fields = {k: v for k, v in fields.items() if k in term.accepts}
    try:
        term.sig.bind(*args, **fields)
    except TypeError as e:
        raise term.fail(sample, f"cannot be called with this sample's fields ({', '.join(sorted(fields))}): {e}") \
            from None
    return term.fn(*args, **fields)


_ASYNC_POOL: concurrent.futures.ThreadPoolExecutor | None = None
_ASYNC_POOL_LOCK = threading.Lock()


def _run_async(coro: Awaitable) -> Any:
    """Run a coroutine to completion from sync code, also when this thread runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    global _ASYNC_POOL
    with _ASYNC_POOL_LOCK:
        if _ASYNC_POOL is None:
            _ASYNC_POOL = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rewards-async")
    return _ASYNC_POOL.submit(asyncio.run, coro).result()


# ------------------------------------------------------------------------------ the scorer


class Scorer:
    """The reward of `RLConfig.rewards` for batches of samples.

    Built at the start of an iteration (every name is checked then: an unknown name, a bad
    argument, a rewards file that fails to import or a missing judge / reward model fails before
    any generation), then `score(samples)` per generated chunk:

        {"reward": sum(weight x value) (None when a judge term has no score for the sample),
         "rewards": {key: value (None: the judge failed)}, "correct": the accuracy term's value or
         None, "judge_failed": bool}

    A reward function that raises or returns a non-number raises RewardError. The judge never
    raises: its failures are None scores (`judge_stats` counts them). `close()` (or `with`)
    closes the judge's HTTP client.
    """

    def __init__(self, specs: list, *, rewards_file: str | Path | None = None, judge=None,
                 reward_model: str | Path | None = None, base_dir: str | Path | None = None,
                 resolve_secret: Callable[[str], str] | None = None, concurrency: int = 32) -> None:
        if not specs:
            raise RewardError("rewards: name at least one reward term")
        base = Path(base_dir) if base_dir is not None else None

        def resolve(p: str | Path) -> Path:
            p = Path(p).expanduser()
            return p if p.is_absolute() or base is None else base / p

        self.concurrency = max(1, int(concurrency))
        self.rewards_file = str(resolve(rewards_file)) if rewards_file is not None else None
        user = load_reward_file(self.rewards_file) if self.rewards_file is not None else {}
        if self.rewards_file is not None:
            self.rewards_file = str(Path(self.rewards_file).resolve())
        self.reward_model = str(resolve(reward_model)) if reward_model is not None else None
        self._rm: tuple[Any, Any] | None = None
        self._rm_lock = threading.Lock()
        self.judge = None
        self.terms: list[_Term] = []
        seen: dict[str, int] = {}
        for spec in specs:
            name, weight, args = _spec_fields(spec)
            if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight):
                raise RewardError(f"reward {name!r}: weight {weight!r} is not a finite number")
            seen[name] = seen.get(name, 0) + 1
            key = name if seen[name] == 1 else f"{name}:{seen[name]}"
            term = _Term(key, name, float(weight), dict(args), kind="")
            if name == "judge":
                term.kind = "judge"
                if judge is None:
                    raise RewardError("rewards: a `judge` term needs the `judge:` section (the judge's teacher)")
                if args:
                    raise RewardError(f"reward 'judge' takes no args (got {sorted(args)}); set them in `judge:`")
            elif name == "reward_model":
                term.kind, term.file = "reward_model", f"reward model {self.reward_model}"
                if self.reward_model is None:
                    raise RewardError("rewards: a `reward_model` term needs `reward_model:` (a reward model dir)")
                unknown = sorted(set(args) - {"batch_size", "normalize", "clip"})
                if unknown:
                    raise RewardError(f"reward 'reward_model': unknown args {unknown} (it takes: batch_size, "
                                      "normalize, clip)")
                _check_reward_model_args(args)
            elif name in user:
                term.kind, term.fn, term.file = "user", user[name], str(self.rewards_file)
                _user_term(term)
            elif name in BUILTINS:
                term.kind, term.fn, term.accuracy = "builtin", BUILTINS[name], name in ACCURACY_BUILTINS
                _builtin_args(term)
            else:
                avail = [*BUILTINS, *SPECIAL]
                where = (f"; functions of {self.rewards_file}: {', '.join(sorted(user)) or 'none'}"
                         if self.rewards_file is not None else "; no rewards_file is set")
                raise RewardError(f"unknown reward {name!r}: built-ins are {', '.join(avail)}{where}")
            self.terms.append(term)
        if any(t.kind == "reward_model" for t in self.terms):
            from mlxcore.preference.reward import is_reward_dir

            if not is_reward_dir(self.reward_model):
                raise RewardError(f"reward_model {self.reward_model}: not a reward model dir (config.json with a "
                                  "*ForSequenceClassification architecture); train one with the reward-model flow")
        if any(t.kind == "judge" for t in self.terms):
            from mlxcore.rl.judge import Judge

            self.judge = Judge(judge, resolve_secret=resolve_secret)
        acc = next((t for t in self.terms if t.accuracy), None)
        self.accuracy_key: str | None = acc.key if acc is not None else None

    @classmethod
    def from_config(cls, config, base_dir: str | Path | None = None, **kw: Any) -> "Scorer":
        """The scorer of an RLConfig (its rewards, rewards_file, judge and reward_model)."""
        return cls(config.rewards, rewards_file=config.rewards_file, judge=config.judge,
                   reward_model=config.reward_model, base_dir=base_dir, **kw)

    # ---------------------------------------------------------------- lifecycle

    @property
    def keys(self) -> list[str]:
        return [t.key for t in self.terms]

    @property
    def judge_stats(self) -> dict[str, Any] | None:
        return self.judge.stats if self.judge is not None else None

    def close(self) -> None:
        if self.judge is not None:
            self.judge.close()

    def __enter__(self) -> "Scorer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---------------------------------------------------------------- scoring

    def score(self, samples: list[Sample]) -> list[dict[str, Any]]:
        """Each sample's {"reward", "rewards", "correct", "judge_failed"} (see the class doc)."""
        samples = list(samples)
        values: dict[str, list[float | None]] = {}
        pending: list[tuple[_Term, int, Awaitable]] = []
        try:
            for term in self.terms:
                if term.kind == "builtin":
                    values[term.key] = [self._builtin(term, s) for s in samples]
                elif term.kind == "user":
                    col: list[float | None] = [None] * len(samples)
                    for i, s in enumerate(samples):
                        out = self._user(term, s)
                        if inspect.isawaitable(out):
                            pending.append((term, i, out))
                        else:
                            col[i] = self._checked(term, s, out)
                    values[term.key] = col
        except BaseException:
            for _, _, c in pending:  # started nowhere: close them (no "never awaited" warning)
                close = getattr(c, "close", None)
                if close is not None:
                    close()
            raise
        if pending:
            results = _run_async(self._gather([c for _, _, c in pending]))
            for (term, i, _), (ok, out) in zip(pending, results):
                s = samples[i]
                if not ok:
                    raise term.fail(s, f"raised {_describe(out, term.file)}") from out
                values[term.key][i] = self._checked(term, s, out)
        for term in self.terms:
            if term.kind == "reward_model":
                values[term.key] = self._reward_model(term, samples)
        judge_terms = [t for t in self.terms if t.kind == "judge"]
        if judge_terms and samples:
            scores = self.judge.score(samples)
            for t in judge_terms:
                values[t.key] = list(scores)
        out = []
        for i in range(len(samples)):
            rewards = {t.key: values[t.key][i] for t in self.terms}
            failed = any(rewards[t.key] is None for t in judge_terms)
            total = None if failed else float(sum(t.weight * rewards[t.key] for t in self.terms))
            correct = rewards[self.accuracy_key] if self.accuracy_key is not None else None
            out.append({"reward": total, "rewards": rewards, "correct": correct, "judge_failed": failed})
        return out

    async def _gather(self, coros: list[Awaitable]) -> list[tuple[bool, Any]]:
        sem = asyncio.Semaphore(self.concurrency)

        async def one(c: Awaitable) -> tuple[bool, Any]:
            async with sem:
                try:
                    return True, await c
                except Exception as e:  # reported per sample, in sample order
                    return False, e

        return await asyncio.gather(*(one(c) for c in coros))

    def _checked(self, term: _Term, sample: Sample, value: Any) -> float:
        x, problem = _as_number(value)
        if problem is not None:
            raise term.fail(sample, problem)
        return x

    def _builtin(self, term: _Term, sample: Sample) -> float:
        try:
            value = term.fn(sample, **term.args)
        except Exception as e:
            raise term.fail(sample, f"raised {_describe(e)}") from e
        return self._checked(term, sample, value)

    def _user(self, term: _Term, sample: Sample) -> Any:
        try:
            return _call_user(term, sample)
        except RewardError:
            raise
        except Exception as e:
            raise term.fail(sample, f"raised {_describe(e, term.file)}") from e

    def _reward_model(self, term: _Term, samples: list[Sample]) -> list[float]:
        if not samples:
            return []
        from mlxcore.preference import reward as rm

        with self._rm_lock:
            if self._rm is None:
                from mlxcore.data import tokenizer as tokenizers

                model, _ = rm.load(self.reward_model)
                self._rm = (model, tokenizers.load(self.reward_model))
            model, tok = self._rm
            try:
                scores = rm.score(model, [s.messages for s in samples], [s.completion for s in samples],
                                  tokenizer=tok, batch_size=int(term.args.get("batch_size", 16)))
            except Exception as e:
                raise RewardError(f"reward function 'reward_model' ({term.file}) raised {_describe(e)} on samples "
                                  f"{samples[0].id} .. {samples[-1].id} from {samples[0].where}",
                                  file=term.file, function="reward_model", sample_id=samples[0].id,
                                  where=samples[0].where) from e
        return [self._checked(term, s, _transform_score(v, term.args)) for s, v in zip(samples, scores)]


def _check_reward_model_args(args: Mapping[str, Any]) -> None:
    """`normalize: {mean, std > 0}` and `clip > 0` of a `reward_model` term, checked when the scorer is built."""
    norm = args.get("normalize")
    if norm is not None:
        if not isinstance(norm, Mapping) or set(norm) != {"mean", "std"}:
            raise RewardError(f"reward 'reward_model': normalize must be {{mean: ..., std: ...}}, got {norm!r}")
        if not all(_finite(norm[k]) for k in ("mean", "std")) or norm["std"] <= 0:
            raise RewardError(f"reward 'reward_model': normalize needs a finite mean and std > 0, got {dict(norm)}")
    clip = args.get("clip")
    if clip is not None and (not _finite(clip) or clip <= 0):
        raise RewardError(f"reward 'reward_model': clip must be a number > 0, got {clip!r}")


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _transform_score(score: float, args: Mapping[str, Any]) -> float:
    """A reward model's score through the term's `normalize` and `clip` (see the module doc)."""
    norm, clip = args.get("normalize"), args.get("clip")
    if norm is not None:
        score = (score - norm["mean"]) / norm["std"]
    if clip is not None:
        score = min(max(score, -clip), clip)
    return score


def _spec_fields(spec: Any) -> tuple[str, Any, Mapping[str, Any]]:
    if isinstance(spec, Mapping):
        name, weight, args = spec.get("name"), spec.get("weight", 1.0), spec.get("args") or {}
    else:
        name, weight, args = spec.name, spec.weight, spec.args or {}
    if not isinstance(name, str) or not name:
        raise RewardError(f"reward term {spec!r}: no name")
    if not isinstance(args, Mapping):
        raise RewardError(f"reward {name!r}: args must be a mapping, got {type(args).__name__}")
    return name, weight, args


def _builtin_args(term: _Term) -> None:
    sig = _signature(term.fn, f"built-in reward {term.name!r}")
    try:
        sig.bind(None, **term.args)
    except TypeError as e:
        takes = [p for p in list(sig.parameters)[1:]]
        raise RewardError(f"built-in reward {term.name!r}: bad args {sorted(term.args)}: {e} (it takes: "
                          f"{', '.join(takes) or 'no args'})", file=BUILTIN, function=term.name) from None
    check = _ARG_CHECKS.get(term.name)
    if check is not None:
        try:
            check(term.args)
        except ValueError as e:
            raise RewardError(f"built-in reward {term.name!r}: {e}", file=BUILTIN, function=term.name) from None
