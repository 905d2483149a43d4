"""Verified-wrong teacher replies kept beside the rows, and the preference pairs they make.

A sampled stand-in teacher (`KnownTeacher(first_wrong=...)`) answers some prompts wrong on the
first ask and right on the next, some always wrong, and restates others (no answer): the first
run keeps the wrong replies, a re-run asks them again and pairs the now-right replies with them.
Torn lines, a SIGKILL and a lost pairs file leave files a re-run (or `write_pairs`) completes.
"""

import json
import signal
import subprocess
import sys
import time

import pytest

from mlxcore.data.rows import RowStore, iter_rows, make_row
from mlxcore.distill import prompts as prompt_gen
from mlxcore.distill.generate import companion_paths, generate, make_pair, write_pairs, wrong_id
from mlxcore.distill.verify import check
from mlxcore.clients.chat import TeacherConfig

from tests.known_teacher import KnownTeacher, first_wrong_on, is_right, restates
from tests.ollama_standin import OllamaStandin

CFG = prompt_gen.PromptConfig(seed=7)


def _teacher(hub):
    return TeacherConfig(url=hub.url, workers=4, timeout_s=2, retries=3, backoff_s=0.05, max_backoff_s=0.2)


def _read(path):
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n")  # every line whole
    return [json.loads(line) for line in data.split(b"\n")[:-1]]


def _expected_pair_ids(rows, wrong):
    accepted = {r["meta"]["id"] for r in rows}
    return {w["meta"]["id"] for w in wrong if w["meta"]["prompt_id"] in accepted}


def _assert_consistent(tmp_path, teacher):
    """rows / rejected / pairs agree: one pair per stored wrong reply whose prompt has a row,
    chosen the row's verified-right reply, rejected the stored verified-wrong one."""
    rows, wrong, pairs = (_read(tmp_path / n) for n in ("rows.jsonl", "rejected.jsonl", "pairs.jsonl"))
    by_prompt = {r["meta"]["id"]: r for r in rows}
    wrong_by_id = {w["meta"]["id"]: w for w in wrong}
    assert len(wrong_by_id) == len(wrong)  # no wrong reply stored twice ...
    assert len({(w["meta"]["prompt_id"], w["conversations"][-1]["content"]) for w in wrong}) == len(wrong)
    for w in wrong:  # ... and only checked, different final answers (never no_answer, refusals)
        p = teacher.by_id[w["meta"]["prompt_id"]]
        assert w["conversations"][:-1] == p.messages and w["meta"]["reason"].startswith("wrong answer")
        assert check(p, w["conversations"][-1]["content"]).reason.startswith("wrong answer")
        assert w["meta"]["correct"] is False and not restates(p, teacher.restate)
    ids = [pr["id"] for pr in pairs]
    assert len(set(ids)) == len(ids)  # no duplicate pair
    assert set(ids) == _expected_pair_ids(rows, wrong)  # every pair there is to make, made
    for pr in pairs:
        assert set(pr) == {"prompt", "chosen", "rejected", "id", "prompt_id", "category"}
        p = teacher.by_id[pr["prompt_id"]]
        assert pr["prompt"] == p.text and pr["category"] == p.category  # one user message: its text
        assert pr["chosen"] == by_prompt[p.id]["conversations"][-1]["content"] == teacher.reply(p)
        assert pr["rejected"] == wrong_by_id[pr["id"]]["conversations"][-1]["content"]
        assert check(p, pr["chosen"]).ok and check(p, pr["rejected"]).reason.startswith("wrong answer")
    return rows, wrong, pairs


def test_wrong_replies_are_kept_and_paired_when_a_rerun_gets_them_right(tmp_path):
    teacher = KnownTeacher(CFG, restate=0.2, first_wrong=0.5)
    out = tmp_path / "rows.jsonl"
    with OllamaStandin(answer=teacher.answer) as hub:
        first = generate(_teacher(hub), CFG, out, 40)
        rows, wrong, pairs = _assert_consistent(tmp_path, teacher)
        # one ask per prompt: wrong first tries are kept, not yet paired
        assert first["wrong_kept"] == len(wrong) == first["rejections"]["wrong answer"] > 5
        assert first["rejections"]["no_answer"] > 0  # restatements were rejected but not kept
        assert pairs == [] and first["pairs"] == first["new_pairs"] == 0
        assert any(first_wrong_on(teacher.by_id[w["meta"]["prompt_id"]], 0.5) for w in wrong)
        assert any(not is_right(teacher.by_id[w["meta"]["prompt_id"]]) for w in wrong)

        second = generate(_teacher(hub), CFG, out, 80)  # asks the rejected prompts again
        rows, wrong2, pairs = _assert_consistent(tmp_path, teacher)
        assert wrong2[: len(wrong)] == wrong  # appended to, never rewritten
        paired = {pr["prompt_id"] for pr in pairs}
        # every wrong first try of the first run was asked again, answered right and paired;
        # prompts answered wrong every time have no pair
        retried = {i for i in (w["meta"]["prompt_id"] for w in wrong) if first_wrong_on(teacher.by_id[i], 0.5)}
        assert len(retried) > 3 and retried <= paired
        assert all(first_wrong_on(teacher.by_id[i], 0.5) for i in paired)
        assert second["pairs"] == second["new_pairs"] == len(pairs)
        assert second["wrong_kept"] == len(wrong2)
        # the prompts answered with the same wrong answer every time were asked again: stored once
        again = [i for i, n in teacher.asked().items()
                 if n > 1 and check(teacher.by_id[i], teacher.reply(teacher.by_id[i])).reason.startswith("wrong")]
        assert again and all(sum(w["meta"]["prompt_id"] == i for w in wrong2) == 1 for i in again)

        before = {n: (tmp_path / n).read_bytes() for n in ("rows.jsonl", "rejected.jsonl", "pairs.jsonl")}
        third = generate(_teacher(hub), CFG, out, 80)  # at the target: nothing asked, nothing written
        assert third["pairs"] == len(pairs) and third["new_pairs"] == 0
        assert {n: (tmp_path / n).read_bytes() for n in before} == before
        fourth = generate(_teacher(hub), CFG, out, 100)  # more rows: the old rejected prompts asked a third time
        _, _, pairs4 = _assert_consistent(tmp_path, teacher)
        assert pairs4[: len(pairs)] == pairs and fourth["pairs"] == len(pairs4)


def test_torn_lines_in_the_rejected_and_pairs_files_are_repaired_and_the_pair_rewritten(tmp_path):
    teacher = KnownTeacher(CFG, first_wrong=0.6)
    out = tmp_path / "rows.jsonl"
    with OllamaStandin(answer=teacher.answer) as hub:
        generate(_teacher(hub), CFG, out, 30)
        generate(_teacher(hub), CFG, out, 60)
    rows, wrong, pairs = _assert_consistent(tmp_path, teacher)
    assert len(pairs) >= 2
    pairs_path, rejected_path = tmp_path / "pairs.jsonl", tmp_path / "rejected.jsonl"
    good_pairs, good_rejected = pairs_path.read_bytes(), rejected_path.read_bytes()
    # a crash while appending the last pair: half its line is on disk
    last = good_pairs.rstrip(b"\n").rsplit(b"\n", 1)[-1] + b"\n"
    pairs_path.write_bytes(good_pairs[: -len(last)] + last[: len(last) // 2])
    # ... and while appending another wrong reply
    with open(rejected_path, "ab") as f:
        f.write(b'{"conversations":[{"role":"user","content":"What is')

    with OllamaStandin(answer=teacher.answer) as hub:  # at the target: no request, the files are mended
        stats = generate(_teacher(hub), CFG, out, 60)
        assert not hub.chat_bodies()
    assert pairs_path.read_bytes() == good_pairs  # the torn pair dropped, then written again whole
    assert rejected_path.read_bytes() == good_rejected
    assert stats["pairs"] == len(pairs) and stats["new_pairs"] == 1 and stats["wrong_kept"] == len(wrong)

    # write_pairs does the same without a teacher: torn tail, then a lost pairs file
    pairs_path.write_bytes(good_pairs[: -len(last)] + last[:7])
    assert write_pairs(tmp_path) == len(pairs) and pairs_path.read_bytes() == good_pairs
    assert write_pairs(tmp_path) == len(pairs) and pairs_path.read_bytes() == good_pairs  # idempotent
    pairs_path.unlink()
    assert write_pairs(tmp_path) == len(pairs)
    assert sorted(map(json.dumps, _read(pairs_path))) == sorted(map(json.dumps, pairs))


CHILD = """
import sys
from mlxcore.distill import prompts
from mlxcore.distill.generate import generate
from mlxcore.clients.chat import TeacherConfig
generate(TeacherConfig(url=sys.argv[1], workers=4, timeout_s=5), prompts.PromptConfig(seed=7), sys.argv[2], 150)
"""


def test_sigkill_mid_run_leaves_files_a_rerun_completes(tmp_path):
    teacher = KnownTeacher(CFG, first_wrong=0.5)
    out = tmp_path / "rows.jsonl"
    with OllamaStandin(answer=teacher.answer) as hub:
        generate(_teacher(hub), CFG, out, 20)  # wrong first tries on disk, to be paired by the child
        with OllamaStandin(answer=teacher.answer, delay_s=0.03) as slow:
            child = subprocess.Popen([sys.executable, "-c", CHILD, slow.url, str(out)])
            deadline = time.time() + 60
            while time.time() < deadline and (not (tmp_path / "pairs.jsonl").exists()
                                               or (tmp_path / "pairs.jsonl").read_bytes().count(b"\n") < 3):
                time.sleep(0.005)
            child.send_signal(signal.SIGKILL)
            assert child.wait() == -signal.SIGKILL
        # what the killed run left: whole lines (or one torn tail) and only pairs of stored halves
        rows, wrong = list(iter_rows(out)), list(iter_rows(tmp_path / "rejected.jsonl"))
        partial = list(iter_rows(tmp_path / "pairs.jsonl"))
        assert len(rows) < 150 and 3 <= len(partial) and {p["id"] for p in partial} <= _expected_pair_ids(rows, wrong)
        stats = generate(_teacher(hub), CFG, out, 150)
    _, _, pairs = _assert_consistent(tmp_path, teacher)
    assert stats["pairs"] == len(pairs) and stats["rows"] == 150


def test_write_pairs_matches_either_order_and_keeps_a_system_prompt(tmp_path):
    system = [{"role": "system", "content": "Answer with a number."}, {"role": "user", "content": "2 + 2?"}]
    plain = [{"role": "user", "content": "3 + 3?"}]

    def right(messages, pid):
        return make_row(messages=messages, reply="Answer: ok", id=pid, category="math", teacher="t", verified=True)

    def wrong(messages, pid, reply):
        return make_row(messages=messages, reply=reply, id=wrong_id(pid, messages, reply), category="math",
                        teacher="t", verified=True, prompt_id=pid, reason="wrong answer: got '5', expected '4'",
                        correct=False)

    assert write_pairs(tmp_path) == 0 and list(tmp_path.iterdir()) == []  # nothing to pair: nothing created
    rejected_path, pairs_path = companion_paths(tmp_path / "rows.jsonl")
    with RowStore(rejected_path, unique_prompts=False) as rejected:
        assert rejected.append(wrong(system, "a", "Answer: 5"))  # before its prompt's row exists
        assert rejected.append(wrong(system, "a", "Answer: 6"))  # a second wrong reply to one prompt
        assert not rejected.append(wrong(system, "a", "Answer: 5"))  # the same one again: refused
        assert rejected.append(wrong(plain, "b", "Answer: 7"))
        assert rejected.append(wrong([{"role": "user", "content": "never right"}], "c", "Answer: 1"))
    with RowStore(tmp_path / "rows.jsonl") as rows:
        rows.append(right(system, "a"))
    assert write_pairs(tmp_path) == 2
    with RowStore(tmp_path / "rows.jsonl") as rows:  # b's row arrives after its wrong reply
        rows.append(right(plain, "b"))
    with RowStore(rejected_path, unique_prompts=False) as rejected:  # a wrong reply after a's row
        assert rejected.append(wrong(system, "a", "Answer: 8"))
    assert write_pairs(tmp_path) == 4 and write_pairs(tmp_path) == 4
    pairs = _read(pairs_path)
    assert [(p["prompt_id"], p["rejected"]) for p in pairs] == [("a", "Answer: 5"), ("a", "Answer: 6"),
                                                                ("a", "Answer: 8"), ("b", "Answer: 7")]
    assert pairs[0]["prompt"] == system and pairs[3]["prompt"] == "3 + 3?"  # list when a system message
    assert all(p["chosen"] == "Answer: ok" and p["category"] == "math" for p in pairs)
    assert pairs[0]["id"] == wrong_id("a", system, "Answer: 5") != pairs[1]["id"]
    assert make_pair(right(plain, "b"), wrong(plain, "b", "Answer: 7")) == pairs[3]


def test_a_store_of_several_replies_per_prompt_and_a_store_of_flat_rows(tmp_path):
    msgs = [{"role": "user", "content": "q"}]
    with RowStore(tmp_path / "w.jsonl", unique_prompts=False) as store:
        for i in range(3):
            assert store.append(make_row(messages=msgs, reply=f"r{i}", id=f"w{i}", category="math", teacher="t",
                                         verified=True))
        assert not store.append(make_row(messages=msgs, reply="x", id="w1", category="math", teacher="t",
                                         verified=True))
        assert store.count == 3 and store.has_prompt(msgs)
    with RowStore(tmp_path / "w.jsonl") as store:  # the default still refuses a second reply per prompt
        assert store.count == 3 and not store.append(
            make_row(messages=msgs, reply="y", id="w9", category="math", teacher="t", verified=True))
    with RowStore(tmp_path / "p.jsonl") as store:
        assert store.append({"id": "p1", "prompt": "q", "chosen": "a", "rejected": "b"})
        assert store.append({"id": "p2", "prompt": "q", "chosen": "a", "rejected": "c"})  # same prompt: fine
        assert not store.append({"id": "p1", "prompt": "q", "chosen": "a", "rejected": "d"})
        with pytest.raises(ValueError):
            store.append({"prompt": "q"})  # no id anywhere
    torn = b'{"id": "p3", "pro'
    with open(tmp_path / "p.jsonl", "ab") as f:
        f.write(torn)
    with RowStore(tmp_path / "p.jsonl") as store:
        assert store.repaired_bytes == len(torn) and store.count == 2 and store.has("p2") and store.bad_lines == 0
