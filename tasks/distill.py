"""Distillation stages: teacher health, the prompt corpus, generation and the concurrent student.

Generation and student training run at the same time (the flow submits both) and meet in the
rows dir: `<run>/distill-rows-<key>/rows.jsonl`, its `state.json` and, once the target is
reached, its manifest. Beside the rows the generator keeps the teacher's verified-wrong replies
(`rejected.jsonl`) and the preference pairs they make with the accepted ones (`pairs.jsonl`,
rows {"prompt", "chosen", "rejected", "id", "prompt_id", "category"}; see
`mlxcore.distill.generate`); `generate_rows` returns the pairs file and its count. The rows dir's
key covers what decides the rows' content (teacher model, API and sampling, prompt stream,
checks) but not the target or the worker count, so raising `target_rows` continues the same file.
The student's dir is keyed by the rows dir, tokenizer, student and training config and the
target. Neither task uses Prefect's result cache: both resume from their own dirs (rows already
written, the last checkpoint), and a finished one returns at once.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from mlxcore.train.callbacks import CallbackList, ProgressBar, TrainingCallback
from mlxcore.config import DistillConfig, SampleConfig, StreamConfig, StudentConfig, TrainConfig
from mlxcore.distill import prompts as prompt_gen
from mlxcore.distill.generate import companion_paths, generate
from mlxcore.distill.prompts import PromptConfig
from mlxcore.data.rows import iter_rows
from mlxcore.distill.student import ROWS_FILE, StudentJob, mark_generation, planned_steps
from mlxcore.clients.chat import Teacher, TeacherConfig, TeacherError
from mlxcore.bench import answers
from mlxcore.distill import verify
from mlxcore.distill.verify import VerifyPolicy, check
from mlxcore import lineage
from mlxcore.io import atomic_dir, dir_digest, is_complete, read_manifest, sha256_file, sha256_json, write_manifest
from mlxcore.train.launch import run_in_subprocess
from tasks.caching import Stage, code_version, sweep
from tasks.progress import PrefectProgress, StageProgress, artifact_key
from tasks.runlog import HOOKS, stage_callback
from tasks.secrets import prefect_secret
from tasks.train import crashed

CORPUS = Stage("prompt-corpus")
CONTENT_KEYS = ("model", "api", "temperature", "top_p", "max_tokens")  # what shapes a teacher's rows


def _token() -> str:
    """Shared by the generator and the student of one flow run (a new one for every run)."""
    return str(flow_run.id or f"local-{time.time_ns()}")


def rows_dir(config: DistillConfig) -> Path:
    """Where the rows of this teacher / prompt stream / checks live (the target is not part of it).

    Deliberately narrower than a stage's code version (tasks.caching): rows cost teacher calls,
    so only the prompt generator, the checks and the answer parser key them, not the modules they import.
    """
    code = [sha256_file(Path(m.__file__)) for m in (prompt_gen, verify, answers)]
    key = sha256_json({"teacher": config.teacher.model_dump(include=set(CONTENT_KEYS)),
                       "prompts": config.prompts.model_dump(), "verify": config.verify.model_dump(), "code": code})
    return config.run_dir / f"distill-rows-{key[:12]}"


def student_dir(config: DistillConfig, tokenizer_dir: str) -> Path:
    body = {"rows": rows_dir(config).name, "tokenizer": read_manifest(tokenizer_dir)["digest"],
            "init_from": dir_digest(config.student.init_from) if config.student.init_from else None,
            "student": config.student.model_dump(), "train": config.train.model_dump(),
            "stream": config.stream.model_dump(), "target_rows": config.target_rows,
            "code": code_version(__name__)}  # what this module runs, as a Stage of it is keyed
    return config.run_dir / f"distill-student-{sha256_json(body)[:12]}"


def _unreachable(task, task_run, state) -> bool:
    """Retry a teacher that did not answer, is busy (429) or answered garbage (it may be starting); a missing
    model fails at once."""
    try:
        state.result()
    except TeacherError as e:
        return e.kind in ("connection", "timeout", "5xx", "429", "malformed")  # a busy or restarting teacher
    except Exception:
        return False
    return False


@task(name="teacher-health", retries=2, retry_delay_seconds=3, retry_condition_fn=_unreachable, **HOOKS)
def check_teacher(teacher: TeacherConfig) -> dict:
    """Fail fast, with the fix, when the teacher is not running or lacks the model."""
    with Teacher(teacher, resolve_secret=prefect_secret) as t:
        return t.health()


@CORPUS.task()
def prompt_corpus(prompts: PromptConfig, num_prompts: int, run_dir: str) -> dict:
    """Prompt texts (and their answers) to train a fresh student's tokenizer on, before any row exists."""
    out = CORPUS.dir(locals())
    if not CORPUS.done(out):
        with atomic_dir(out) as tmp:
            with open(tmp / "prompts.jsonl", "w") as f:
                for p in prompt_gen.prompts(prompts, 0, num_prompts):
                    text = p.text + (f"\nAnswer: {p.truth}" if p.truth is not None else "")
                    f.write(json.dumps({"text": text}) + "\n")
            write_manifest(tmp, "prompt-corpus", {"prompts": prompts.model_dump(), "num_prompts": num_prompts})
    return {"train": [str(out / "prompts.jsonl")], "val": []}


class _GenerationReport:
    """Progress artifact (rows / target) plus the latest stats, for the final tables."""

    def __init__(self, target: int):
        self.progress, self.target, self.last = StageProgress(f"distill: {target} verified rows"), target, None

    def __call__(self, stats: dict) -> None:
        self.last = stats
        self.progress(min(stats["rows"], self.target), self.target)


def _publish_generation(stats: dict, run_name: str) -> None:
    table = [{"category": c, "answered": v.get("answered", 0), "accepted": v.get("accepted", 0),
              "no_answer": v.get("no_answer", 0), "acceptance": round(v["acceptance"], 3),
              "teacher_errors": v.get("errors", 0)}
             for c, v in sorted(stats["categories"].items())]
    create_table_artifact(table=table, key=artifact_key(run_name, "distill", "acceptance"),
                          description="Teacher replies kept per category (math and logic checked against the truth; "
                                      "no_answer: replies that state no final answer, e.g. a restated question)")
    t = stats["teacher"]
    faults = (f"{t.get('retries', 0)} failed attempts retried ({t.get('recovered', 0)} calls recovered), "
              f"{t.get('unrecovered', 0)} calls unrecovered; budget: give up past {t.get('failure_budget')} "
              f"unrecovered of the last {t.get('failure_window')} calls (now {t.get('window_unrecovered', 0)} "
              f"of {t.get('window_calls', 0)})")
    create_markdown_artifact(
        key=artifact_key(run_name, "distill", "generation"),
        markdown=(f"### generation\n\n| | |\n|---|---|\n| rows | {stats['rows']} / {stats['target_rows']} "
                  f"({stats['new_rows']} new) |\n| rows/s | {stats['rows_per_s']:.2f} |\n"
                  f"| no answer | {stats['rejections'].get('no_answer', 0)} replies stated no final answer |\n"
                  f"| preference pairs | {stats.get('pairs', 0)} ({stats.get('new_pairs', 0)} new; "
                  f"{stats.get('wrong_kept', 0)} verified-wrong replies kept) |\n"
                  f"| teacher faults | {faults} |\n"
                  f"| elapsed | {stats['elapsed_s']:.0f} s |\n| rejections | {stats['rejections']} |\n"
                  f"| teacher | {json.dumps(t, default=str)} |\n| torn tail repaired | {stats['repaired_bytes']} bytes |\n"))


# rows dir -> the stop event of the generator writing it in this process (set by `stop_generation`)
_STOPS: dict[str, threading.Event] = {}


def stop_generation(rows_dir: str) -> None:
    """Ask this process's generator of `rows_dir` to stop. The flow calls it when it is interrupted:
    Ctrl-C, SIGTERM or a Prefect cancel reach the flow's thread, not the task's, which would
    otherwise go on asking the teacher until its target (the student stops once it sees the
    generator failed)."""
    event = _STOPS.get(str(Path(rows_dir)))
    if event is not None:
        event.set()


@task(name="distill-generate", **HOOKS)
def generate_rows(rows_dir: str, teacher: TeacherConfig, prompts: PromptConfig, verify: VerifyPolicy,
                  target_rows: int, max_prompts: int | None) -> dict:
    """Ask the teacher until `rows_dir` holds `target_rows` verified rows; resumes after any crash."""
    out, token = Path(rows_dir), _token()
    rows_path = out / ROWS_FILE
    pairs_path = companion_paths(rows_path)[1]
    if is_complete(out):
        if read_manifest(out, "distill-rows")["rows"] >= target_rows:
            stats = read_manifest(out)["stats"]
            if "pairs_count" not in stats:  # made before pairs were kept: count what is there, write nothing
                stats["pairs_count"] = sum(1 for _ in iter_rows(pairs_path)) if pairs_path.exists() else 0
            return {"path": str(out), "rows_file": str(rows_path), **stats, "pairs": str(pairs_path)}
        (out / "manifest.json").unlink()  # a higher target: go on appending to the same file
    out.mkdir(parents=True, exist_ok=True)
    mark_generation(out, token, "running")
    report = _GenerationReport(target_rows)
    _STOPS[str(out)] = stop = threading.Event()
    try:
        with Teacher(teacher, resolve_secret=prefect_secret) as client:  # its key is read here, in this process
            stats = generate(client, prompts, rows_path, target_rows, policy=verify, max_prompts=max_prompts,
                             on_progress=report, progress_every=1.0, progress_bar=True, stop=stop)
    except BaseException as e:
        mark_generation(out, token, "failed", error=f"{type(e).__name__}: {e}"[:2000])
        if report.last is not None:
            _publish_generation(report.last, out.parent.name)
        raise
    finally:
        _STOPS.pop(str(out), None)
    _publish_generation(stats, out.parent.name)
    small = {k: stats[k] for k in ("rows", "new_rows", "rows_per_s", "elapsed_s", "teacher_errors", "rejections",
                                   "wrong_kept")}
    small["pairs_count"] = stats["pairs"]
    small["acceptance"] = {c: round(v["acceptance"], 4) for c, v in stats["categories"].items()}
    write_manifest(out, "distill-rows", {"teacher": teacher.model_dump(include=set(CONTENT_KEYS)),
                                         "prompts": prompts.model_dump(), "verify": verify.model_dump()},
                   rows=stats["rows"], stats=small, **lineage.fields(teacher_lineage(teacher)))
    mark_generation(out, token, "done")
    return {"path": str(out), "rows_file": str(rows_path), **small, "pairs": str(pairs_path)}


class _WaitProgress(TrainingCallback):
    """Before training starts the student waits for its cold-start rows: say so in the UI."""

    def __init__(self, run_name: str):
        self.run_name, self.said = run_name, False

    def on_wait(self, info: dict) -> None:
        if not self.said and info["why"] == "cold start":
            self.said = True
            create_markdown_artifact(key=artifact_key(self.run_name, "distill", "student-wait"),
                                     markdown=f"student: waiting for {info['waiting_for']} rows before training "
                                              f"(cold start; {info['rows']} so far)")


def teacher_lineage(teacher: TeacherConfig) -> dict:
    """The teacher as the source of the rows: its model name, API and host (never its key)."""
    return lineage.of_sources(lineage.teacher_source(teacher.model, teacher.api, teacher.url))


@task(name="distill-student", retries=1, retry_condition_fn=crashed, **HOOKS)
def train_student(rows_dir: str, tokenizer_dir: str, student: StudentConfig, train: TrainConfig,
                  stream: StreamConfig, target_rows: int, out_dir: str, run_dir: str,
                  teacher: TeacherConfig | None = None) -> dict:
    """SFT the student on the rows while they are written: cold start, paced, until its planned steps."""
    out = Path(out_dir)
    sweep(run_dir)  # temp files of a student or generator that was killed
    if is_complete(out / "model"):
        state = json.loads((out / "model" / "trainer_state.json").read_text())
        return {"checkpoint": str(out / "model"), "step": state["step"], "val_loss": state.get("final_val_loss"),
                "initial_val_loss": state.get("initial_val_loss"), "resumed_from": str(out / "model")}
    steps = planned_steps(target_rows, stream, train)
    job = StudentJob(rows_dir=rows_dir, token=_token(), tokenizer_dir=tokenizer_dir, out_dir=str(out),
                     train=train.model_copy(update={"steps": steps, "warmup_steps": min(train.warmup_steps, steps)}),
                     stream=stream, model=None if student.init_from else student.model, init_from=student.init_from,
                     lineage=teacher_lineage(teacher) if teacher is not None else None)
    run_name = Path(run_dir).name
    callback = CallbackList(ProgressBar("student"), PrefectProgress("student", run_name), _WaitProgress(run_name),
                            stage_callback("student", run_dir))
    return run_in_subprocess(job, callback)


def held_out_prompts(rows_dir: str, stream: StreamConfig, n: int) -> list[dict]:
    """The first `n` held-out rows (never trained on): prompt messages and the teacher's reply."""
    out = []
    for row in iter_rows(Path(rows_dir) / ROWS_FILE):
        if len(out) == min(n, stream.val_rows):
            break
        out.append({"messages": row["conversations"][:-1], "teacher": row["conversations"][-1]["content"],
                    "id": row["meta"]["id"], "category": row["meta"]["category"]})
    return out


@task(name="distill-compare", **HOOKS)
def compare(checkpoint: str, rows_dir: str, prompts: PromptConfig, verify: VerifyPolicy, stream: StreamConfig,
            sample: SampleConfig, run_dir: str) -> dict:
    """The student's replies to held-out prompts beside the teacher's, through the same checks."""
    from mlxcore.models.generate import load_chat, reply

    model, tok = load_chat(checkpoint)
    table, per_prompt = [], []  # per_prompt: what champion / challenger promotion pairs up without a bench
    for h in held_out_prompts(rows_dir, stream, sample.num_prompts):
        text = reply(model, tok, h["messages"], sample.max_tokens, sample.temperature, sample.top_p)
        p = prompt_gen.prompt(prompts, int(h["id"].rsplit("-", 1)[1]))
        table.append({"category": h["category"], "prompt": h["messages"][-1]["content"][:200],
                      "teacher": h["teacher"][:300], "student": text[:300], "student_passes": check(p, text, verify).ok})
        per_prompt.append({"id": h["id"], "reward": float(table[-1]["student_passes"]),
                           "correct": float(table[-1]["student_passes"])})
    if table:
        create_table_artifact(table=table, key=artifact_key(Path(run_dir).name, "distill", "samples"),
                              description="Held-out prompts: the teacher's kept reply and the student's")
    return {"samples": table, "student_pass_rate": sum(r["student_passes"] for r in table) / max(len(table), 1),
            "per_prompt": per_prompt}
