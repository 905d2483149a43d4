"""The distill flow end to end under a real Prefect server.

Teachers: the Ollama stand-in (Ollama's binary cannot be installed here) answering a known 70% of
the checkable prompts right, and a real `mlx_lm.server` on loopback serving a tiny model built
here (OpenAI API). The student trains while the rows are written.
"""

import json
import os
import time

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from mlxcore.config import DistillConfig
from mlxcore.distill import prompts as prompt_gen
from mlxcore.distill.verify import check

from tests.conftest import micro_model, run_deployment
from tests.known_teacher import KnownTeacher, is_right
from tests.ollama_standin import OllamaStandin

pytestmark = pytest.mark.usefixtures("prefect_server")

PROMPTS = prompt_gen.PromptConfig(seed=5)
TEACHER = KnownTeacher(PROMPTS, n=1500)


def distill_config(root, teacher_url: str, target: int = 120, **over) -> dict:
    cfg = {
        "name": "t", "out_dir": str(root), "target_rows": target, "prompts": PROMPTS.model_dump(),
        "teacher": {"url": teacher_url, "workers": 2, "timeout_s": 1.0, "retries": 8, "backoff_s": 0.05,
                    "max_backoff_s": 0.3},  # the default failure budget: retried faults never count
        "student": {"model": micro_model().model_dump(), "tokenizer": {"vocab_size": 512}},
        "train": {"steps": 400, "batch_size": 8, "seq_len": 96, "lr": 3e-3, "warmup_steps": 2, "eval_every": 10,
                  "eval_batches": 1, "save_every": 5, "log_every": 2},
        "stream": {"val_rows": 8, "cold_start_rows": 16, "epochs": 3, "poll_s": 0.05},
        "sample": {"num_prompts": 4, "max_tokens": 24},
        "bench": None,
    }
    for key, value in over.items():
        cfg[key] = {**(cfg.get(key) or {}), **value} if isinstance(value, dict) else value
    return cfg


def _run(cfg: dict):
    from flows.distill import distill

    state = distill(DistillConfig.model_validate(cfg), return_state=True)
    assert state.is_completed(), state.message
    return state.state_details.flow_run_id, state.result()


def _artifacts(flow_run_id) -> dict:
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {(a.key or a.type): a for a in arts}


def _history(checkpoint) -> list[dict]:
    with open(os.path.join(checkpoint, "trainer_state.json")) as f:
        return json.load(f)["history"]


def _held_until_student_checkpoint(root, after: int):
    """TEACHER.answer, but from the `after`-th answer on, only once the student saved a checkpoint:
    proof that training ran while rows were still arriving, whatever the machine's speed."""
    answered = []

    def answer(messages):
        answered.append(1)
        deadline = time.time() + 120
        while len(answered) > after and not list(root.glob("t/distill-student-*/checkpoints/step-*")):
            assert time.time() < deadline, "the student never saved a checkpoint"
            time.sleep(0.05)
        return TEACHER.answer(messages)

    return answer


def test_distill_keeps_only_right_answers_while_the_student_trains(tmp_path):
    with OllamaStandin(answer=_held_until_student_checkpoint(tmp_path, 60), delay_s=0.02) as hub:
        cfg = distill_config(tmp_path, hub.url)
        flow_run_id, out = _run(cfg)
        asked = [b["messages"][-1]["content"] for b in hub.chat_bodies()]
    rows_file = os.path.join(out["rows"]["path"], "rows.jsonl")
    rows = TEACHER.assert_clean(rows_file, 120)  # only right answers, no duplicate, every line whole
    kept = {r["meta"]["id"] for r in rows}
    right_asked = {TEACHER.bank[t].id for t in asked if TEACHER.bank[t].truth is None or is_right(TEACHER.bank[t])}
    assert len(right_asked - kept) <= 2 * 2  # a right answer is only ever missing when it was in flight at the target
    acc = out["rows"]["acceptance"]
    assert acc["knowledge"] == 1.0 and all(0.45 < acc[c] < 0.95 for c in ("math", "logic", "reasoning") if c in acc)
    # the student trained on the growing file: its first steps saw fewer rows than the target, later ones all
    train_events = [h for h in _history(out["checkpoint"]) if h["event"] == "train"]
    assert train_events[0]["rows"] < 120 and train_events[-1]["rows"] == 120
    assert sorted(h["rows"] for h in train_events) == [h["rows"] for h in train_events]
    steps = out["train"]["step"]
    assert steps == -(-3 * (120 - 8) // 8)  # epochs x train rows / batch
    assert out["train"]["val_loss"] < out["train"]["initial_val_loss"] - 1.0
    arts = _artifacts(flow_run_id)
    assert {"t-distill-acceptance", "t-distill-generation", "t-student-metrics", "t-distill-samples"} <= set(arts)
    assert sum(1 for a in arts.values() if a.type == "progress") >= 2 or any(k == "progress" for k in arts)
    table = arts["t-distill-acceptance"].data
    table = json.loads(table) if isinstance(table, str) else table
    assert {r["category"] for r in table} >= {"math", "knowledge"}

    # a second run finds everything done: no teacher request, the same rows, the same student
    before = open(rows_file, "rb").read()
    with OllamaStandin(answer=TEACHER.answer) as hub:
        _, again = _run(distill_config(tmp_path, hub.url))
        assert hub.chat_bodies() == []
    assert open(rows_file, "rb").read() == before and again["checkpoint"] == out["checkpoint"]

    # a higher target continues the same rows file
    with OllamaStandin(answer=TEACHER.answer) as hub:
        _, more = _run(distill_config(tmp_path, hub.url, target=150))
    assert more["rows"]["path"] == out["rows"]["path"] and more["rows"]["new_rows"] == 30
    rows_after = TEACHER.assert_clean(rows_file, 150)
    assert open(rows_file, "rb").read().startswith(before) and len(rows_after) == 150
    # champion / challenger: the first student is the champion; the 150-row one was judged against it on the
    # same held-out prompts (no bench: the teacher's checks of their replies); <run>/model is the champion
    book = json.loads((tmp_path / "t" / "promotion.json").read_text())
    assert [h["key"] for h in book["history"]] == [out["checkpoint"], more["checkpoint"]]
    assert book["history"][0]["promoted"] and book["history"][1]["metric"] == "eval_accuracy"
    assert book["history"][1]["champion_score"] == book["history"][0]["score"] == out["samples"]["student_pass_rate"]
    assert os.path.realpath(tmp_path / "t" / "model") == os.path.realpath(book["champion"]["checkpoint"])


def test_distill_from_a_real_mlx_lm_server_into_a_lora_student(tmp_path, mlx_lm_server):
    url, model = mlx_lm_server
    cfg = distill_config(tmp_path, url, target=40,
                         teacher={"api": "openai", "model": "default_model", "max_tokens": 24, "temperature": 0.0,
                                  "timeout_s": 60},
                         prompts={"weights": {"math": 0.5, "knowledge": 0.5}, "seed": 5},
                         verify={"knowledge": {"verify": False}},  # a random model writes no real prose
                         student={"init_from": str(model)},
                         train={"fine_tune_type": "lora", "steps": 10, "batch_size": 4, "seq_len": 96,
                                "lr": 1e-3, "warmup_steps": 1, "eval_every": 5, "save_every": 5, "log_every": 1,
                                "eval_batches": 1},
                         bench={"suites": ["math_mcq", "copy"], "examples": 4, "max_tokens": 8})
    _, out = _run(cfg)
    # the last stage: the student beside its teacher (the real server) and the random baseline
    assert list(out["bench"]["overall"]) == ["student", "teacher", "random"]
    assert all(s["n"] == 8 for s in out["bench"]["overall"].values())
    assert out["bench"]["overall"]["teacher"]["tok_per_s"] > 0 and out["bench"]["accuracy"]["math_mcq"]["random"] >= 0
    rows = [json.loads(line) for line in open(os.path.join(out["rows"]["path"], "rows.jsonl"))]
    assert len(rows) == 40 and len({r["meta"]["id"] for r in rows}) == 40
    cfg_p = prompt_gen.PromptConfig(weights={"math": 0.5, "knowledge": 0.5}, seed=5)
    for r in rows:  # math rows only when the random model happened to be right, which the check recomputes
        p = prompt_gen.prompt(cfg_p, int(r["meta"]["id"].rsplit("-", 1)[1]))
        assert r["conversations"][:-1] == p.messages
        if p.category == "math":
            assert r["meta"]["verified"] and check(p, r["conversations"][-1]["content"]).ok
        else:
            assert r["meta"]["verified"] is False
    assert out["rows"]["acceptance"].get("math", 0.0) == 0.0 and out["rows"]["rejections"]["no_answer"] > 0
    assert out["train"]["step"] == 10 and (os.path.exists(os.path.join(out["checkpoint"], "adapters.safetensors")))


def test_serve_then_prefect_deployment_run_completes(tmp_path):
    """The README's sequence: `mlxflow serve`, then `prefect deployment run distill/default`."""
    with OllamaStandin(answer=TEACHER.answer, delay_s=0.01) as hub:
        cfg = distill_config(tmp_path, hub.url, target=60)
        done = run_deployment("distill/default", ["--params", json.dumps({"config": cfg}),
                                                  "-p", 'overrides=["target_rows=50"]'])
        assert done.returncode == 0 and "Completed" in done.stdout, done.stdout + done.stderr
        assert len(hub.chat_bodies()) >= 50
    [rows_dir] = [p for p in (tmp_path / "t").iterdir() if p.name.startswith("distill-rows-")]
    TEACHER.assert_clean(rows_dir / "rows.jsonl", 50)  # the override took effect over the config's 60


def test_no_teacher_fails_fast_with_the_fix_and_writes_nothing(tmp_path, capsys):
    from flows.cli import main
    from tests.ollama_standin import closed_url

    url = closed_url()
    code = main(["run", "distill", "--set", f"out_dir={tmp_path}", "--set", f"teacher.url={url}"])
    err = capsys.readouterr().err
    assert code == 1 and f"cannot reach the teacher at {url}" in err and "is `ollama serve` running" in err
    assert not any(p.name.startswith(("distill-rows", "distill-student")) for p in (tmp_path / "distill").glob("*"))
    with OllamaStandin(models=("llama3:8b",)) as hub:  # up, but without the model: no retry, the fix
        code = main(["run", "distill", "--set", f"out_dir={tmp_path}", "--set", f"teacher.url={hub.url}"])
    assert code == 1 and "ollama pull qwen3:0.6b" in capsys.readouterr().err


def test_distill_pairs_the_teachers_right_and_wrong_replies_and_dpo_on_them_learns(tmp_path):
    """A sampled teacher, wrong on its first ask of some prompts and right on a later one: the
    distill run keeps both, writes pairs.jsonl, and its `preference:` stage trains the student on
    them (no human labels): held-out pairs go from ties (0.5) to mostly right."""
    teacher = KnownTeacher(PROMPTS, n=1500, first_wrong=0.5)
    train = {"steps": 400, "eval_every": 20, "save_every": 20}
    with OllamaStandin(answer=teacher.answer) as hub:
        _run(distill_config(tmp_path, hub.url, target=80, train=train))  # first asks: some wrong, kept
    preference = {"objective": {"name": "dpo", "beta": 0.1},
                  "train": {"steps": 40, "batch_size": 8, "seq_len": 96, "lr": 1e-3, "warmup_steps": 2, "eval_every": 20,
                            "eval_batches": 1, "save_every": 20, "log_every": 5}}
    with OllamaStandin(answer=teacher.answer) as hub:  # a higher target asks the rejected prompts again: right now
        _, out = _run(distill_config(tmp_path, hub.url, target=140, train=train, preference=preference))
    rows_dir = out["rows"]["path"]
    pairs = [json.loads(line) for line in open(os.path.join(rows_dir, "pairs.jsonl"))]
    assert out["rows"]["pairs_count"] == len(pairs) >= 10
    for pair in pairs:
        p = next(b for b in teacher.bank.values() if b.id == pair["prompt_id"])
        assert check(p, pair["chosen"]).ok and not check(p, pair["rejected"]).ok
    evals = out["preference"]["eval"]
    print("distill pairs", len(pairs), evals["start"]["accuracy"], "->", evals["trained"]["accuracy"])
    assert evals["start"]["accuracy"] == 0.5 and evals["trained"]["accuracy"] >= 0.75
    assert out["checkpoint"] == out["preference"]["checkpoint"]
