"""Data parallel over mx.distributed (ring backend, 2 local ranks): same result as one big batch, resumable."""

import subprocess

import mlx.core as mx
import numpy as np
import pytest

from mlxcore.models import checkpoint
from mlxcore.train import loop as train
from mlxcore.train.callbacks import TrainingCallback
from mlxcore.train.launch import TrainingCrashed, run_in_subprocess
from mlxcore.train.loop import TrainJob

from tests.conftest import micro_model, quick_train

pytestmark = pytest.mark.skipif(not mx.distributed.is_available(), reason="mlx built without distributed")


def _job(small_data, out, kind="pretrain", **overrides):
    cfg = dict(steps=10, eval_every=5, save_every=5, eval_batches=2)
    return TrainJob(data_dir=str(small_data[kind]), tokenizer_dir=str(small_data["tok"]), out_dir=str(out),
                    model=micro_model(), train=quick_train(**{**cfg, **overrides}))


def _weights(path):
    return mx.load(str(path / "model.safetensors"))


def _assert_close(a, b, atol):
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_allclose(np.array(b[k]), np.array(a[k]), atol=atol, err_msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["pretrain", "sft"])
def test_two_ranks_train_like_one_rank_with_the_doubled_batch(small_data, tmp_path, kind):
    one = run_in_subprocess(_job(small_data, tmp_path / "one", kind, batch_size=8))
    two = run_in_subprocess(_job(small_data, tmp_path / "two", kind, batch_size=4, world_size=2))
    # Same rows, same token-weighted gradient; only the float32 summation order differs.
    _assert_close(_weights(tmp_path / "one/model"), _weights(tmp_path / "two/model"), atol=1e-5)
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)
    assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-5)
    assert two["tokens"] == one["tokens"] or kind == "sft"  # SFT counts each rank's own padding
    # only rank 0 wrote: one set of checkpoints, no stray temp dirs
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path / "two/checkpoints")] == [5, 10]
    assert not list((tmp_path / "two").rglob(".tmp-*"))


@pytest.mark.slow
def test_a_killed_rank_stops_the_job_and_a_rerun_resumes_it(small_data, tmp_path):
    overrides = dict(steps=20, batch_size=4, world_size=2, save_every=5, eval_every=10)
    straight = run_in_subprocess(_job(small_data, tmp_path / "straight", **overrides))

    class KillRankOneOnCheckpoint(TrainingCallback):
        def on_checkpoint(self, info):  # rank 1 has MLX_RANK=1 in its environment; kill it by job path
            out = subprocess.run(["pgrep", "-f", str(tmp_path / "killed" / "job.json")], capture_output=True, text=True)
            pids = [int(p) for p in out.stdout.split()]
            for pid in pids:
                env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
                if b"MLX_RANK=1" in env:
                    subprocess.run(["kill", "-KILL", str(pid)])

    job = _job(small_data, tmp_path / "killed", **overrides)
    with pytest.raises(TrainingCrashed, match="killed by signal 9"):
        run_in_subprocess(job, KillRankOneOnCheckpoint())
    assert not (tmp_path / "killed/model").exists()
    done = checkpoint.list_checkpoints(tmp_path / "killed/checkpoints")
    assert done and done[-1][0] < 20
    events = []

    class Record(TrainingCallback):
        def on_event(self, event, info):
            events.append((event, info))

    resumed = run_in_subprocess(job, Record())
    assert events[0][1]["start_step"] == done[-1][0] and events[0][1]["world_size"] == 2
    assert resumed["step"] == 20 and "step-" in resumed["resumed_from"]
    _assert_close(_weights(tmp_path / "straight/model"), _weights(tmp_path / "killed/model"), atol=1e-6)
    assert resumed["val_loss"] == pytest.approx(straight["val_loss"], rel=1e-6)


def test_world_size_without_launched_ranks_is_a_clear_error(small_data, tmp_path, monkeypatch):
    monkeypatch.delenv("MLX_RANK", raising=False)
    with pytest.raises(ValueError, match="mlx.launch -n 2"):
        train.run(_job(small_data, tmp_path / "x", world_size=2, batch_size=4))
