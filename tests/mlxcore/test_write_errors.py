"""Writes that fail for reasons outside the program (disk full, read-only filesystem) say so in
one line naming the path, leave the previous checkpoint intact, and a re-run resumes.

The disk is a real tmpfs of a few MB mounted for the test (root only; skipped with the reason
elsewhere); the trainer is the real `python -m mlxcore.train.launch` child.
"""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from mlxcore.models import checkpoint as ckpt
from mlxcore.io import WriteError, as_write_error, atomic_dir, write_json
from mlxcore.train.launch import TrainingFailed, run_in_subprocess
from mlxcore.models.model import from_config, hf_config
from mlxcore.train.loop import TrainJob

from tests.conftest import micro_model, quick_train


def test_os_errors_become_one_line_naming_the_path_and_the_cause(tmp_path):
    err = as_write_error(tmp_path / "x", OSError(errno.ENOSPC, "No space left on device"))
    assert str(err).startswith(f"cannot write {tmp_path / 'x'}: no space left on device (")  # (N MiB free)
    assert "\n" not in str(err) and isinstance(err, OSError) and err.errno == errno.ENOSPC
    assert str(as_write_error(tmp_path, PermissionError(errno.EACCES, "Permission denied"))) == \
        f"cannot write {tmp_path}: permission denied"
    assert as_write_error(tmp_path, ValueError("bad data")) is None  # not an I/O failure: left as it is
    assert as_write_error(tmp_path, FileNotFoundError(errno.ENOENT, "x")) is None


@pytest.fixture
def tiny_fs(tmp_path):
    """mount(size_bytes) -> a tmpfs of that size at tmp_path/fs; remount(**opts); unmounted at the end."""
    mnt = tmp_path / "fs"
    mnt.mkdir()

    def mount(size: int) -> Path:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or 'mount failed'}): needs root")
        return mnt

    def remount(opts: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{opts}", str(mnt)], check=True)

    yield mount, remount
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _checkpoint_bytes(small_data, tmp_path) -> int:
    """What one checkpoint of the micro model takes on disk (weights, AdamW moments, tokenizer, state)."""
    import mlx.optimizers as optim

    model = from_config(hf_config(micro_model(), 512))
    opt = optim.AdamW(1e-3)
    opt.init(model.trainable_parameters())
    path = ckpt.save(tmp_path / "probe", model, hf_config(micro_model(), 512), {"step": 0}, opt, small_data["tok"])
    return sum(p.stat().st_size for p in path.iterdir())


def _train(job: TrainJob, tmp_path: Path) -> subprocess.CompletedProcess:
    (tmp_path / "job.json").write_text(job.model_dump_json())
    return subprocess.run([sys.executable, "-m", "mlxcore.train.launch", str(tmp_path / "job.json")],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_full_disk_mid_training_fails_in_one_line_keeps_the_last_checkpoint_and_resumes(small_data, tmp_path, tiny_fs):
    mount, remount = tiny_fs
    one = _checkpoint_bytes(small_data, tmp_path)
    fs = mount(int(1.6 * one) // 4096 * 4096)  # room for one checkpoint, not two
    out = fs / "run"
    job = TrainJob(data_dir=str(small_data["pretrain"]), tokenizer_dir=str(small_data["tok"]), out_dir=str(out),
                   model=micro_model(), train=quick_train(steps=10, save_every=5, eval_every=0))

    r = _train(job, tmp_path)
    assert r.returncode == 1, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert "Traceback" not in r.stderr, r.stderr
    assert lines[-1].startswith(f"mlxcore.train.launch: error: cannot write {out / 'checkpoints' / 'step-00000010'}: "
                                "no space left on device"), r.stderr
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000005"]  # no temp dir left, the last intact
    model, _ = __import__("mlx_lm").load(str(out / "checkpoints" / "step-00000005"))  # loadable as it is
    assert json.loads((out / "checkpoints/step-00000005/trainer_state.json").read_text())["step"] == 5

    # the same failure through the launcher the stages use: one line, the path and the cause
    with pytest.raises(TrainingFailed) as failed:
        run_in_subprocess(job)
    assert "\n" not in str(failed.value) and "no space left on device" in str(failed.value)
    assert str(out / "checkpoints" / "step-00000010") in str(failed.value)

    remount("ro")
    r = _train(job, tmp_path)
    assert r.returncode == 1 and "read-only file system" in r.stderr.splitlines()[-1] and "Traceback" not in r.stderr

    remount("rw,size=64m")  # space freed: the same command resumes from step 5 and finishes
    result = run_in_subprocess(job)
    assert result["step"] == 10 and result["resumed_from"] == str(out / "checkpoints" / "step-00000005")
    assert (out / "model" / "manifest.json").is_file() and not list(out.rglob(".tmp-*"))


def test_atomic_writes_on_a_full_disk_leave_nothing_behind(tmp_path, tiny_fs):
    mount, _ = tiny_fs
    fs = mount(256 * 1024)
    write_json(fs / "state.json", {"ok": 1})
    with pytest.raises(WriteError, match=f"cannot write {fs / 'big'}: no space left on device"):
        with atomic_dir(fs / "big") as tmp:
            mx.save_safetensors(str(tmp / "w.safetensors"), {"w": mx.zeros((512, 512))})  # 1 MiB
    (fs / "ballast").write_bytes(b"\0" * (200 * 1024))
    with pytest.raises(WriteError, match=f"cannot write {fs / 'state.json'}: no space left on device"):
        write_json(fs / "state.json", {"x": "y" * (100 * 1024)})
    assert json.loads((fs / "state.json").read_text()) == {"ok": 1}  # the old file, whole
    assert sorted(p.name for p in fs.iterdir()) == ["ballast", "state.json"]


def test_a_row_store_on_a_full_disk_names_the_file_and_keeps_every_whole_row(tmp_path, tiny_fs):
    from mlxcore.data.rows import RowStore, iter_rows

    mount, _ = tiny_fs
    fs = mount(64 * 1024)
    row = lambda i: {"conversations": [{"role": "user", "content": f"q{i}"},  # noqa: E731
                                       {"role": "assistant", "content": "x" * 3000}], "meta": {"id": f"r{i}"}}
    with RowStore(fs / "rows.jsonl") as store:
        with pytest.raises(WriteError, match=f"cannot write {fs / 'rows.jsonl'}: no space left on device"):
            for i in range(100):
                store.append(row(i))
        written = store.count
    assert 0 < written < 100 and [r["meta"]["id"] for r in iter_rows(fs / "rows.jsonl")] == [f"r{i}" for i in range(written)]
