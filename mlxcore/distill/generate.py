"""The generation half of distillation: prompts -> teacher -> verified rows in a JSONL store.

`generate(...)` walks the prompt stream from index 0 (each prompt is a function of (seed,
index)), skips prompts whose id or prompt hash is already in the store, asks the teacher
`workers` at a time, checks each reply (`verify.check`) and appends the accepted ones. It stops
once the store holds `target_rows` rows. Run it again after any crash: the store repairs a torn
last line and the rows already written are skipped, so nothing is lost or duplicated, and the
run continues to the target. Rejected prompts are not remembered; a re-run asks them again
(a sampled teacher may get them right the second time).

Stats: per category `answered` (replies checked), `accepted`, `no_answer` (replies that state no
final answer, e.g. a restated question: `verify.NO_ANSWER`), `errors` (calls lost to teacher
errors); `rejections` counts every rejection reason ("wrong answer", "no_answer", "refusal",
...); `teacher` is the client's stats (retried attempts, calls recovered by retrying, unrecovered
calls and the failure budget they are held against).

A reply that never came (the teacher's retries ran out) is counted and skipped; when the
teacher's failure budget is spent (too many recent calls unrecovered, see `teacher.py`),
`TeacherGaveUp` propagates, with every accepted row already on disk.
"""

from __future__ import annotations

import collections
import contextlib
import time
from pathlib import Path
from typing import Any, Callable

from mlxcore.distill import prompts as prompt_gen
from mlxcore.data.rows import RowStore, make_row, prompt_hash
from mlxcore.clients.chat import Teacher, TeacherConfig, TeacherError
from mlxcore.distill.verify import NO_ANSWER, VerifyPolicy, check


class GenerationStalled(RuntimeError):
    """The prompt budget ran out before the target (the teacher's answers keep failing checks)."""


def generate(teacher: TeacherConfig | Teacher, prompt_cfg: prompt_gen.PromptConfig, out_path: str | Path,
             target_rows: int, *, policy: VerifyPolicy | None = None, max_prompts: int | None = None,
             on_progress: Callable[[dict], None] | None = None, progress_every: float = 2.0,
             progress_bar: bool = False) -> dict[str, Any]:
    """Append verified teacher rows to `out_path` until it holds `target_rows`; the run's stats.

    `max_prompts` bounds the prompt indices tried (default 20 x target_rows) so a teacher that
    never passes the checks ends in GenerationStalled instead of looping forever. `progress_bar`
    draws a terminal bar of rows (tqdm, on stderr).
    """
    policy = policy or VerifyPolicy()
    with contextlib.ExitStack() as owned:
        client = teacher if isinstance(teacher, Teacher) else owned.enter_context(Teacher(teacher))
        bar = None
        if progress_bar:
            from tqdm.auto import tqdm

            bar = owned.enter_context(tqdm(total=target_rows, desc="distill rows", unit="row", dynamic_ncols=True))
        return _generate(client, prompt_cfg, Path(out_path), target_rows, policy, max_prompts, on_progress,
                         progress_every, bar)


def _generate(client: Teacher, prompt_cfg, out_path: Path, target_rows: int, policy: VerifyPolicy,
              max_prompts: int | None, on_progress, progress_every: float, bar=None) -> dict[str, Any]:
    label = f"{client.config.api}:{client.config.model}"
    max_prompts = max_prompts or 20 * target_rows
    per_cat: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    reasons: collections.Counter = collections.Counter()
    started, last_report = time.monotonic(), 0.0
    with RowStore(out_path) as store:
        at_start = store.count
        stats = {"rows": store.count, "new_rows": 0, "target_rows": target_rows, "repaired_bytes": store.repaired_bytes,
                 "teacher_errors": 0, "categories": per_cat, "rejections": reasons}

        def report(final: bool = False) -> dict:
            elapsed = time.monotonic() - started
            out = {**stats, "elapsed_s": elapsed, "rows_per_s": stats["new_rows"] / max(elapsed, 1e-9),
                   "categories": {c: {"answered": 0, "accepted": 0, "no_answer": 0, "errors": 0, **v,
                                      "acceptance": v["accepted"] / max(v["answered"], 1)} for c, v in per_cat.items()},
                   "rejections": dict(reasons), "teacher": client.stats, "done": final}
            if on_progress is not None:
                on_progress(out)
            if bar is not None:
                bar.update(min(stats["rows"], target_rows) - bar.n)
                answered = sum(v["answered"] for v in per_cat.values())
                bar.set_postfix(kept=f"{sum(v['accepted'] for v in per_cat.values()) / max(answered, 1):.0%}",
                                rows_s=f"{out['rows_per_s']:.2f}", refresh=False)
            return out

        if store.count >= target_rows:
            return report(final=True)
        pending: dict[int, prompt_gen.Prompt] = {}

        def jobs():
            for index in range(max_prompts):
                p = prompt_gen.prompt(prompt_cfg, index)
                if store.has(p.id) or store.has_prompt(prompt_hash(p.messages)):
                    continue
                pending[index] = p
                yield index, p.messages

        results = client.imap_unordered(jobs())
        try:
            for index, reply in results:
                p = pending.pop(index)
                cat = per_cat[p.category]
                if isinstance(reply, TeacherError):
                    stats["teacher_errors"] += 1
                    cat["errors"] += 1
                    continue
                cat["answered"] += 1
                text = reply.text  # the client already removed a leading <think> block
                verdict = check(p, text, policy, reply.finish_reason)
                if not verdict.ok:
                    reasons[verdict.reason.split(":")[0].split(" (")[0]] += 1  # "wrong answer", "no_answer", ...
                    if verdict.reason == NO_ANSWER:
                        cat["no_answer"] += 1
                    continue
                row = make_row(messages=p.messages, reply=text.strip(), id=p.id, category=p.category, teacher=label,
                               verified=verdict.verified, kind=p.kind)
                if store.append(row):
                    cat["accepted"] += 1
                    stats["new_rows"] = store.count - at_start
                    stats["rows"] = store.count
                if store.count >= target_rows:
                    break
                now = time.monotonic()
                if now - last_report >= progress_every:
                    report()
                    last_report = now
        finally:
            results.close()  # stop issuing requests; replies in flight are dropped, never written
        if store.count < target_rows:
            raise GenerationStalled(
                f"{out_path}: {store.count} of {target_rows} rows after trying {max_prompts} prompts "
                f"(rejections: {dict(reasons)}, teacher errors: {stats['teacher_errors']}); "
                "check the teacher's answers or raise max_prompts")
        return report(final=True)

