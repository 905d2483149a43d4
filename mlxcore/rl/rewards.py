"""RL rewards: GSM8K answer checking, built-in reward functions, user reward files and the `Scorer`
that turns `RLConfig.rewards` into one number per sampled completion.

The GSM8K helpers, `Sample`, `RewardError`, `reward_function` and the built-in rewards live in
`mlxcore.rl.builtin_rewards` (re-exported here).

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
import sys
import threading
import traceback
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlxcore.rl.builtin_rewards import (  # noqa: F401  (re-exported: callers and rewards files import them from here)
    extract_answer, gsm8k_truth, correctness_reward, format_reward, reward, Sample, RewardError, BUILTIN,
    ACCURACY_ATTR, NAME_ATTR, reward_function, numeric_match, exact_match, gsm8k_format, format_match, overlong,
    length, repetition, BUILTINS, ACCURACY_BUILTINS, _ARG_CHECKS, SPECIAL)

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
