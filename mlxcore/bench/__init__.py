"""A deterministic synthetic benchmark: seven small suites (multiple-choice arithmetic, reading
comprehension, logic, general knowledge, sorting, JSON output, copying) whose examples are pure
functions of (suite, seed, index) (`suites`), rule-based scorers that tolerate common reply
surface forms (`scoring`), targets that answer them (`run`: a checkpoint, an Ollama model, an
OpenAI-compatible endpoint, or the uniform-random baseline that gives each suite its chance
level) and the side-by-side report (`report`). No Prefect import.

    from mlxcore.bench import answer, make
    from mlxcore.bench.report import report
    from mlxcore.config import BenchTarget
    questions = make(["copy", "sort"], 40)
    rep = report({"demo": answer(BenchTarget(kind="checkpoint", path="runs/demo/model"), questions),
                  "random": answer(BenchTarget(kind="random"), questions)})
"""

from mlxcore.bench.run import answer
from mlxcore.bench.scoring import Score, score
from mlxcore.bench.suites import SUITES, Example, baseline, example, make

__all__ = ["SUITES", "Example", "Score", "answer", "baseline", "example", "make", "score"]
