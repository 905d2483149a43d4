"""A deterministic synthetic benchmark: seven small suites (multiple-choice arithmetic, reading
comprehension, logic, general knowledge, sorting, JSON output, copying) whose examples are pure
functions of (suite, seed, index) (`suites`), rule-based scorers that tolerate common reply
surface forms (`scoring`), targets that answer them (`run`: a checkpoint, an Ollama model, an
OpenAI-compatible endpoint, or the uniform-random baseline that gives each suite its chance
level) and the side-by-side report (`report`); with them, what every evaluation shares: the
final answer of a reply (`answers`, also used by the distill checks and RL rewards), held-out
loss and perplexity (`perplexity`) and charts for reports (`plots`). No Prefect import.

    from mlxcore.bench import answer, make
    from mlxcore.bench.report import report
    from mlxcore.config import BenchTarget
    questions = make(["copy", "sort"], 40)
    rep = report({"demo": answer(BenchTarget(kind="checkpoint", path="runs/demo/model"), questions),
                  "random": answer(BenchTarget(kind="random"), questions)})
"""

import importlib

# Resolved on first use, so importing one piece (`answers`, `plots`, `perplexity`) does not load
# the others: a stage is keyed on the code it imports (tasks/caching.py).
_LAZY = {"answer": "run", "Score": "scoring", "score": "scoring", "SUITES": "suites", "Example": "suites",
         "baseline": "suites", "example": "suites", "make": "suites"}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"mlxcore.bench.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'mlxcore.bench' has no attribute {name!r}")
