"""The generation half of distillation: prompts -> teacher -> verified rows in a JSONL store, plus
the verified-wrong replies and the preference pairs they make.

`generate(...)` walks the prompt stream from index 0 (each prompt is a function of (seed,
index)), skips prompts whose id or prompt hash is already in the store, asks the teacher
`workers` at a time, checks each reply (`verify.check`) and appends the accepted ones. It stops
once the store holds `target_rows` rows. Run it again after any crash: the store repairs a torn
last line and the rows already written are skipped, so nothing is lost or duplicated, and the
run continues to the target. Rejected prompts are not remembered; a re-run asks them again
(a sampled teacher may get them right the second time).

Three files, side by side (`companion_paths`; for `rows.jsonl`: `rejected.jsonl`, `pairs.jsonl`;
for any other rows file `<stem>.rejected.jsonl`, `<stem>.pairs.jsonl`), each a crash-safe
`RowStore` (a torn last line is repaired on open, nothing is written twice):

  rows.jsonl      the accepted replies, one per prompt (the SFT rows the student trains on)
  rejected.jsonl  every reply verified WRONG (rejection reason "wrong answer": a final answer
                  checked against the prompt's truth and found different; not no_answer,
                  refusals, truncations or teacher errors), in the rows' schema; a prompt may have
                  several. meta: "id" (`wrong_id`: the prompt's id and a hash of (prompt, reply),
                  so a reply repeated on a re-run is stored once), "prompt_id", "category", "kind",
                  "teacher", "prompt_hash", "reason" ("wrong answer: got ..., expected ..."),
                  "extracted", "correct": false, "verified": true (it was checked)
  pairs.jsonl     one preference pair per distinct (prompt, wrong reply) whose prompt also has an
                  accepted row: {"prompt", "chosen", "rejected", "id", "prompt_id", "category"}
                  (`make_pair`); "prompt" is the user message's text, or the message list
                  (system message and all) when the prompt is more than one user message;
                  "chosen" the accepted reply, "rejected" the wrong one, "id" the wrong reply's id

Pairs are written as their second half arrives (an accepted reply for a prompt with wrong replies
stored, or the other way round). Each pair is appended only after both of its halves are on disk,
so a crash at any moment leaves at worst pairs not yet written, never a pair without its halves;
the next run (or `write_pairs(dir)`) writes them: at open, every stored wrong reply without its
pair is matched against the rows. During a run the wrong replies still waiting for an accepted
reply are held in memory.

Stats: per category `answered` (replies checked), `accepted`, `no_answer` (replies that state no
final answer, e.g. a restated question: `verify.NO_ANSWER`), `errors` (calls lost to teacher
errors); `rejections` counts every rejection reason ("wrong answer", "no_answer", "refusal",
...); `wrong_kept` and `pairs` are the rows in the rejected and pairs files (`new_pairs`: written by
this run); `teacher` is the client's stats (retried attempts, calls recovered by retrying,
unrecovered calls and the failure budget they are held against).

A reply that never came (the teacher's retries ran out) is counted and skipped; when the
teacher's failure budget is spent (too many recent calls unrecovered, see `teacher.py`),
`TeacherGaveUp` propagates, with every accepted row already on disk.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from mlxcore.distill import prompts as prompt_gen
from mlxcore.data.rows import RowStore, iter_rows, make_row, prompt_hash
from mlxcore.clients.chat import Teacher, TeacherConfig, TeacherError
from mlxcore.distill.verify import NO_ANSWER, VerifyPolicy, check


__all__ = ["GenerationStalled", "GenerationStopped", "PAIRS_FILE", "REJECTED_FILE", "WRONG_ANSWER", "companion_paths",
           "generate", "make_pair", "write_pairs", "wrong_id"]

REJECTED_FILE, PAIRS_FILE = "rejected.jsonl", "pairs.jsonl"  # beside rows.jsonl (see the module doc)
WRONG_ANSWER = "wrong answer"  # the rejection reason (before its ": got ..., expected ...") of a kept reply


class GenerationStalled(RuntimeError):
    """The prompt budget ran out before the target (the teacher's answers keep failing checks)."""


# A run of this many replies in a row with nothing to check ends generation: a teacher that always
# answers empty (or spends max_tokens thinking) would otherwise cost 20 x target_rows requests
HOLLOW = ("empty reply", "truncated (finish_reason=length)")
HOLLOW_RUN = 100


class GenerationStopped(RuntimeError):
    """`stop` was set (the flow was interrupted: Ctrl-C, SIGTERM, a Prefect cancel): the rows so far are kept."""


# ----------------------------------------------------------------------- wrong replies and pairs

def companion_paths(rows_path: str | Path) -> tuple[Path, Path]:
    """(rejected file, pairs file) of a rows file: `rejected.jsonl` and `pairs.jsonl` beside
    `rows.jsonl`, `<stem>.rejected.jsonl` and `<stem>.pairs.jsonl` beside any other name."""
    rows_path = Path(rows_path)
    if rows_path.name in (REJECTED_FILE, PAIRS_FILE):
        raise ValueError(f"{rows_path}: a rows file may not be named {REJECTED_FILE} or {PAIRS_FILE}")
    if rows_path.name == "rows.jsonl":
        return rows_path.with_name(REJECTED_FILE), rows_path.with_name(PAIRS_FILE)
    stem = rows_path.name.removesuffix(".jsonl")
    return rows_path.with_name(f"{stem}.{REJECTED_FILE}"), rows_path.with_name(f"{stem}.{PAIRS_FILE}")


def wrong_id(prompt_id: str, messages: Sequence[Mapping[str, Any]], reply: str) -> str:
    """The id of a wrong reply: the prompt's id and a hash of (prompt messages, reply)."""
    digest = hashlib.sha256(f"{prompt_hash(messages)}\n{reply}".encode("utf-8")).hexdigest()
    return f"{prompt_id}-w{digest[:16]}"


def _prompt_field(messages: Sequence[Mapping[str, Any]]) -> str | list[dict[str, str]]:
    """A single user message as its text, anything else (a system message, turns) as the list."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _hash_of(row: Mapping[str, Any]) -> str:
    meta = row["meta"]
    return meta.get("prompt_hash") or prompt_hash(row["conversations"][:-1])


def make_pair(accepted: Mapping[str, Any], wrong: Mapping[str, Any]) -> dict[str, Any]:
    """The pairs.jsonl row of an accepted row and a wrong reply (a rejected.jsonl row) to its prompt."""
    meta = wrong["meta"]
    return {"prompt": _prompt_field(accepted["conversations"][:-1]),
            "chosen": accepted["conversations"][-1]["content"], "rejected": wrong["conversations"][-1]["content"],
            "id": str(meta["id"]), "prompt_id": meta.get("prompt_id", accepted["meta"]["id"]),
            "category": meta.get("category", accepted["meta"].get("category"))}


class _Pairer:
    """Pairs wrong replies with their prompt's accepted row as either arrives.

    `unpaired` (prompt hash -> wrong rows without a pair yet) starts as the stored wrong replies
    missing from the pairs file; `complete()` matches them against the rows file."""

    def __init__(self, rows_path: Path, rejected: RowStore, pairs: RowStore):
        self.rows_path, self.pairs = rows_path, pairs
        self.unpaired: dict[str, list[dict]] = collections.defaultdict(list)
        self.rescan = False  # a wrong reply came for a prompt already in the rows file
        for row in iter_rows(rejected.path):
            meta = row.get("meta") if isinstance(row, dict) else None
            if isinstance(meta, dict) and meta.get("id") is not None and not pairs.has(meta["id"]):
                self.unpaired[_hash_of(row)].append(row)
        self.complete()

    def complete(self) -> None:
        """Pair every waiting wrong reply whose prompt has an accepted row in the rows file."""
        self.rescan = False
        if self.unpaired and self.rows_path.exists():
            for row in iter_rows(self.rows_path):
                if isinstance(row, dict) and isinstance(row.get("meta"), dict) and row.get("conversations"):
                    self.accepted(row)
                    if not self.unpaired:
                        break

    def accepted(self, row: Mapping[str, Any]) -> None:
        if not row["meta"].get("verified"):  # only a checked right answer is "chosen"
            return
        for wrong in self.unpaired.pop(_hash_of(row), ()):
            self.pairs.append(make_pair(row, wrong))

    def wrong(self, row: dict, accepted_stored: bool) -> None:
        self.unpaired[_hash_of(row)].append(row)
        self.rescan = self.rescan or accepted_stored


def write_pairs(rows_dir: str | Path, rows_file: str = "rows.jsonl") -> int:
    """Complete the pairs file of `rows_dir/rows_file` from its rows and rejected files (after a
    crash, or to pair rows written elsewhere); idempotent. Returns the pairs in the file.

    Takes the rejected and pairs files' write locks (`RowStoreLocked` while a generator runs on
    them) and repairs a torn last line in either; creates nothing when there is no rejected file."""
    rows_path = Path(rows_dir) / rows_file
    rejected_path, pairs_path = companion_paths(rows_path)
    if not rejected_path.exists():
        if not pairs_path.exists():
            return 0
        with RowStore(pairs_path) as pairs:
            return pairs.count
    with RowStore(rejected_path, unique_prompts=False) as rejected, RowStore(pairs_path) as pairs:
        _Pairer(rows_path, rejected, pairs)
        return pairs.count


# ----------------------------------------------------------------------------------- generate


def generate(teacher: TeacherConfig | Teacher, prompt_cfg: prompt_gen.PromptConfig, out_path: str | Path,
             target_rows: int, *, policy: VerifyPolicy | None = None, max_prompts: int | None = None,
             on_progress: Callable[[dict], None] | None = None, progress_every: float = 2.0,
             progress_bar: bool = False, stop: threading.Event | None = None) -> dict[str, Any]:
    """Append verified teacher rows to `out_path` until it holds `target_rows`; the run's stats.

    `max_prompts` bounds the prompt indices tried (default 20 x target_rows) so a teacher that
    never passes the checks ends in GenerationStalled instead of looping forever. `progress_bar`
    draws a terminal bar of rows (tqdm, on stderr). Setting `stop` (from another thread) ends the
    run with GenerationStopped once the replies in hand are written: no new request is issued and
    each one in flight ends within the teacher's `timeout_s`. Verified-wrong replies and preference pairs go
    to the files beside `out_path` (`companion_paths`, see the module doc).
    """
    policy = policy or VerifyPolicy()
    with contextlib.ExitStack() as owned:
        client = teacher if isinstance(teacher, Teacher) else owned.enter_context(Teacher(teacher))
        bar = None
        if progress_bar:
            from tqdm.auto import tqdm

            bar = owned.enter_context(tqdm(total=target_rows, desc="distill rows", unit="row", dynamic_ncols=True))
        return _generate(client, prompt_cfg, Path(out_path), target_rows, policy, max_prompts, on_progress,
                         progress_every, bar, stop or threading.Event())


def _generate(client: Teacher, prompt_cfg, out_path: Path, target_rows: int, policy: VerifyPolicy,
              max_prompts: int | None, on_progress, progress_every: float, bar,
              stop: threading.Event) -> dict[str, Any]:
    label = f"{client.config.api}:{client.config.model}"
    max_prompts = max_prompts or 20 * target_rows
    per_cat: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    reasons: collections.Counter = collections.Counter()
    started, last_report = time.monotonic(), 0.0
    rejected_path, pairs_path = companion_paths(out_path)
    with RowStore(out_path) as store, RowStore(rejected_path, unique_prompts=False) as rejected, \
            RowStore(pairs_path) as pairs:
        pairs_before = pairs.count
        pairer = _Pairer(out_path, rejected, pairs)  # pairs a crash left unwritten are written here
        at_start = store.count
        stats = {"rows": store.count, "new_rows": 0, "target_rows": target_rows, "repaired_bytes": store.repaired_bytes,
                 "teacher_errors": 0, "categories": per_cat, "rejections": reasons}

        def report(final: bool = False) -> dict:
            elapsed = time.monotonic() - started
            out = {**stats, "elapsed_s": elapsed, "rows_per_s": stats["new_rows"] / max(elapsed, 1e-9),
                   "wrong_kept": rejected.count, "pairs": pairs.count, "new_pairs": pairs.count - pairs_before,
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
                if stop.is_set():
                    return
                p = prompt_gen.prompt(prompt_cfg, index)
                if store.has(p.id) or store.has_prompt(prompt_hash(p.messages)):
                    continue
                pending[index] = p
                yield index, p.messages

        hollow = 0  # replies in a row with no text to check (empty, or cut at max_tokens)
        results = client.imap_unordered(jobs())
        try:
            for index, reply in results:
                if stop.is_set():
                    break
                p = pending.pop(index)
                cat = per_cat[p.category]
                if isinstance(reply, TeacherError):
                    stats["teacher_errors"] += 1
                    cat["errors"] += 1
                    continue
                cat["answered"] += 1
                text = reply.text  # the client already removed a leading <think> block
                verdict = check(p, text, policy, reply.finish_reason)
                hollow = hollow + 1 if verdict.reason in HOLLOW else 0
                if hollow >= HOLLOW_RUN:
                    raise GenerationStalled(
                        f"the teacher {label} at {client.url} gave {hollow} empty or cut-off replies in a row "
                        f"(last: {verdict.reason}; {stats['rows']} rows kept): a thinking model may spend "
                        "max_tokens on its reasoning; raise teacher.max_tokens or pick a model that answers")
                if not verdict.ok:
                    reason = verdict.reason.split(":")[0].split(" (")[0]  # "wrong answer", "no_answer", ...
                    reasons[reason] += 1
                    if verdict.reason == NO_ANSWER:
                        cat["no_answer"] += 1
                    if reason == WRONG_ANSWER:  # a checked, different final answer: keep it for pairs
                        reply_text = text.strip()
                        wrong = make_row(messages=p.messages, reply=reply_text,
                                         id=wrong_id(p.id, p.messages, reply_text), category=p.category,
                                         teacher=label, verified=True, kind=p.kind, prompt_id=p.id,
                                         reason=verdict.reason, extracted=verdict.extracted, correct=False)
                        if rejected.append(wrong):
                            pairer.wrong(wrong, store.has_prompt(wrong["meta"]["prompt_hash"]))
                    continue
                row = make_row(messages=p.messages, reply=text.strip(), id=p.id, category=p.category, teacher=label,
                               verified=verdict.verified, kind=p.kind)
                if store.append(row):
                    pairer.accepted(row)
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
        if pairer.rescan:  # a wrong reply to a prompt whose accepted row was already on disk
            pairer.complete()
        if stop.is_set() and store.count < target_rows:
            raise GenerationStopped(f"{out_path}: stopped at {store.count} of {target_rows} rows; "
                                    "a re-run goes on from there")
        if store.count < target_rows:
            raise GenerationStalled(
                f"{out_path}: {store.count} of {target_rows} rows after trying {max_prompts} prompts on the teacher "
                f"{label} at {client.url} "
                f"(rejections: {dict(reasons)}, teacher errors: {stats['teacher_errors']}); "
                "check the teacher's answers or raise max_prompts")
        return report(final=True)

