"""fit(): learning, schedules, accumulation, checkpoints, init_from and crash-resume."""

import json
import subprocess

import mlx.core as mx
import numpy as np
import pytest

from mlxcore.train import loop as train, optimizers
from mlxcore.train.callbacks import TrainingCallback
from mlxcore.bench.perplexity import loss_ppl
from mlxcore.train.launch import TrainingCrashed, TrainingFailed, run_in_subprocess
from mlxcore.train.loop import TrainJob

from tests.conftest import kill_after_first_checkpoint, micro_model, quick_train


class Recorder(TrainingCallback):
    def __init__(self):
        self.events = []

    def on_event(self, event, info):
        self.events.append((event, info))


def _job(small_data, out, kind="pretrain", **train_overrides):
    return TrainJob(data_dir=str(small_data[kind]), tokenizer_dir=str(small_data["tok"]), out_dir=str(out),
                    model=micro_model(), train=quick_train(**train_overrides))


def _weights(path):
    return mx.load(str(path / "model.safetensors"))


# CPU (and Metal) kernels are deterministic; MLX's CUDA kernels are not bitwise so: two
# identical runs on an H200 differed by up to 7e-5 after 30 steps. Exactness is asserted on CPU.
ON_CPU = mx.default_device() == mx.cpu
ATOL = 2e-6 if ON_CPU else 2e-4


def test_pretraining_reduces_held_out_loss_and_reports_events(small_data, tmp_path):
    rec = Recorder()
    result = train.run(_job(small_data, tmp_path / "run", steps=40), rec)
    assert result["val_loss"] < 0.6 * result["initial_val_loss"]
    kinds = [e for e, _ in rec.events]
    assert kinds[0] == "begin" and kinds[-1] == "end" and kinds.count("train") == 8
    assert [i["step"] for e, i in rec.events if e == "eval"] == [0, 10, 20, 30, 40]
    assert all(i["tok_per_s"] > 0 for e, i in rec.events if e == "train")


def test_checkpoints_are_complete_and_only_the_last_n_are_kept(small_data, tmp_path):
    train.run(_job(small_data, tmp_path / "run", steps=20, save_every=5, keep_last=2), None)
    ckpts = tmp_path / "run/checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000015", "step-00000020"]
    for d in [*ckpts.iterdir(), tmp_path / "run/model"]:
        assert {"config.json", "model.safetensors", "optimizer.safetensors", "trainer_state.json", "tokenizer.json"} <= {p.name for p in d.iterdir()}
    state = json.loads((ckpts / "step-00000015/trainer_state.json").read_text())
    assert state["step"] == 15 and state["cursor"] == {"epoch": 0, "index": 15}
    assert not list((tmp_path / "run").rglob(".tmp-*"))


def test_a_finished_run_is_not_trained_again(small_data, tmp_path):
    first = train.run(_job(small_data, tmp_path / "run", steps=10), None)
    stamp = (tmp_path / "run/model/model.safetensors").stat().st_mtime_ns
    again = train.run(_job(small_data, tmp_path / "run", steps=10), None)
    assert again["val_loss"] == first["val_loss"] and again["resumed_from"].endswith("model")
    assert (tmp_path / "run/model/model.safetensors").stat().st_mtime_ns == stamp


def test_a_crash_between_the_last_checkpoint_and_the_final_model_only_finalizes(small_data, tmp_path):
    import shutil

    first = train.run(_job(small_data, tmp_path / "run", steps=10, save_every=5), None)
    weights = (tmp_path / "run/model/model.safetensors").read_bytes()
    shutil.rmtree(tmp_path / "run/model")  # as if killed right after checkpoints/step-00000010
    rec = Recorder()
    again = train.run(_job(small_data, tmp_path / "run", steps=10, save_every=5), rec)
    assert [e for e, _ in rec.events if e == "train"] == []  # nothing was trained again
    assert (tmp_path / "run/model/model.safetensors").read_bytes() == weights
    assert again["train_loss"] == first["train_loss"] and again["val_loss"] == first["val_loss"]


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = quick_train(steps=100, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    lr = optimizers.lr_schedule(cfg)
    values = [lr(mx.array(s)).item() for s in (0, 9, 10, 55, 100)]
    assert values[0] == pytest.approx(1e-4) and values[1] == pytest.approx(1e-3)
    assert values[2] == pytest.approx(1e-3) and values[3] == pytest.approx(0.55e-3, rel=1e-3)
    assert values[4] == pytest.approx(1e-4)


def test_grad_accumulation_equals_the_big_batch(small_data, tmp_path):
    train.run(_job(small_data, tmp_path / "big", steps=3, batch_size=8, eval_every=0, save_every=0), None)
    train.run(_job(small_data, tmp_path / "acc", steps=3, batch_size=4, grad_accum=2, eval_every=0, save_every=0), None)
    big, acc = _weights(tmp_path / "big/model"), _weights(tmp_path / "acc/model")
    for k in big:
        np.testing.assert_allclose(np.array(acc[k]), np.array(big[k]), atol=ATOL, err_msg=k)


def test_compiled_and_eager_steps_agree(small_data, tmp_path):
    train.run(_job(small_data, tmp_path / "c", steps=3, eval_every=0, save_every=0), None)
    train.run(_job(small_data, tmp_path / "e", steps=3, eval_every=0, save_every=0, compile=False), None)
    c, e = _weights(tmp_path / "c/model"), _weights(tmp_path / "e/model")
    for k in c:
        np.testing.assert_allclose(np.array(c[k]), np.array(e[k]), atol=ATOL, err_msg=k)


def test_sft_init_from_starts_at_the_pretrained_weights(small_data, tmp_path):
    base = train.run(_job(small_data, tmp_path / "base", steps=20), None)
    job = TrainJob(data_dir=str(small_data["sft"]), tokenizer_dir=str(small_data["tok"]), out_dir=str(tmp_path / "sft"),
                   init_from=base["checkpoint"], train=quick_train(steps=20, eval_batches=2))
    rec = Recorder()
    result = train.run(job, rec)
    before = loss_ppl(base["checkpoint"], small_data["sft"], batch_size=8, seq_len=64, max_batches=2)["loss"]
    assert result["initial_val_loss"] == pytest.approx(before, rel=1e-5)
    assert result["val_loss"] < result["initial_val_loss"]
    assert json.loads((tmp_path / "sft/model/config.json").read_text()) == json.loads((tmp_path / "base/model/config.json").read_text())


def test_init_from_needs_the_same_tokenizer(small_data, tmp_path):
    base = train.run(_job(small_data, tmp_path / "base", steps=2, eval_every=0), None)
    other = tmp_path / "tok2"
    other.mkdir()
    for p in small_data["tok"].iterdir():
        (other / p.name).write_bytes(p.read_bytes())
    tok_json = json.loads((other / "tokenizer.json").read_text())
    tok_json["model"]["merges"] = tok_json["model"]["merges"][:-1]
    (other / "tokenizer.json").write_text(json.dumps(tok_json))
    job = TrainJob(data_dir=str(small_data["sft"]), tokenizer_dir=str(other), out_dir=str(tmp_path / "sft"),
                   init_from=base["checkpoint"], train=quick_train(steps=2))
    with pytest.raises(ValueError, match="its tokenizer differs"):
        train.run(job, None)


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical(small_data, tmp_path):
    """Kill the trainer (SIGKILL) after a checkpoint, re-run it, compare with an uninterrupted run."""
    steps = dict(steps=150, save_every=10, eval_every=50, keep_last=3)
    straight = train.run(_job(small_data, tmp_path / "straight", **steps), None)

    job = _job(small_data, tmp_path / "killed", **steps)
    killed_at = kill_after_first_checkpoint(job, tmp_path)
    assert 0 < killed_at < 150

    rec = Recorder()
    resumed = train.run(job, rec)
    assert rec.events[0][1]["start_step"] >= killed_at and resumed["resumed_from"]
    a, b = tmp_path / "straight/model", tmp_path / "killed/model"
    if ON_CPU:
        assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
        assert (a / "optimizer.safetensors").read_bytes() == (b / "optimizer.safetensors").read_bytes()
        assert resumed["val_loss"] == straight["val_loss"]
    else:
        wa, wb = _weights(a), _weights(b)
        for k in wa:
            np.testing.assert_allclose(np.array(wb[k]), np.array(wa[k]), atol=1e-3, err_msg=k)


# ------------------------------------------------------------------ the training subprocess


@pytest.mark.slow
def test_subprocess_relays_events_and_returns_the_result(small_data, tmp_path):
    rec = Recorder()
    result = run_in_subprocess(_job(small_data, tmp_path / "run", steps=10), rec)
    kinds = [e for e, _ in rec.events]
    assert kinds[0] == "begin" and kinds[-2:] == ["end", "result"] and "checkpoint" in kinds and "train" in kinds
    assert result["step"] == 10 and result["checkpoint"] == str(tmp_path / "run/model")
    assert result == dict(rec.events[-1][1]) and json.loads((tmp_path / "run/job.json").read_text())["kind"] == "train"
    assert json.loads((tmp_path / "run/job.json").read_text())["train"]["steps"] == 10


def test_subprocess_error_is_reported_not_retried(small_data, tmp_path):
    job = _job(small_data, tmp_path / "run", batch_size=100000)
    with pytest.raises(TrainingFailed, match="cannot fill one batch"):
        run_in_subprocess(job)


@pytest.mark.slow
def test_a_killed_trainer_is_a_crash_that_resume_can_fix(small_data, tmp_path):
    class KillOnCheckpoint(TrainingCallback):
        def on_checkpoint(self, info):
            subprocess.run(["pkill", "-KILL", "-f", str(tmp_path / "run" / "job.json")])

    job = _job(small_data, tmp_path / "run", steps=200, save_every=10)
    with pytest.raises(TrainingCrashed, match="re-running resumes"):
        run_in_subprocess(job, KillOnCheckpoint())
    assert run_in_subprocess(job)["step"] == 200
