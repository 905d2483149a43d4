"""The distill flow through a faulty network and a SIGKILL: nothing lost, duplicated or torn.

A loopback proxy (tests/fault_proxy.py) sits between the flow and the Ollama stand-in and answers
a fifth of the chat requests with a 500, a 429, a timeout, malformed JSON, a dropped connection
or a cut-off body, and goes down once (a teacher restart). The flow runs as `mlxflow run distill`
in its own process group, which is SIGKILLed (flow and student alike) once rows and a student
checkpoint exist; the same command run again finishes the job.
"""

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import REPO
from tests.fault_proxy import FaultProxy
from tests.flows.test_distill import TEACHER, distill_config
from tests.ollama_standin import OllamaStandin

pytestmark = pytest.mark.usefixtures("prefect_server")


def _complete_lines(path) -> bytes:
    data = path.read_bytes() if path.exists() else b""
    return data[: data.rfind(b"\n") + 1]


def test_faults_and_a_sigkill_lose_and_duplicate_nothing(tmp_path):
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(REPO)}
    target = 150
    with OllamaStandin(answer=TEACHER.answer, delay_s=0.05) as hub, FaultProxy(hub.url, seed=7, hold_s=3) as proxy:
        proxy.random_faults(0.2)
        cfg = distill_config(tmp_path, proxy.url, target=target)
        (tmp_path / "distill.yaml").write_text(yaml.safe_dump(cfg))
        cmd = [sys.executable, "-m", "flows.cli", "run", "distill", "--config", str(tmp_path / "distill.yaml")]
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        rows_file = student = None
        restarted = False
        deadline = time.time() + 300
        try:
            while time.time() < deadline and proc.poll() is None:
                rows_file = next((p / "rows.jsonl" for p in (tmp_path / "t").glob("distill-rows-*")), None)
                n = _complete_lines(rows_file).count(b"\n") if rows_file else 0
                if n >= 30 and not restarted:
                    proxy.restart_async(down_s=0.5)  # the teacher goes away and comes back
                    restarted = True
                student = list((tmp_path / "t").glob("distill-student-*/checkpoints/step-*"))
                if n >= 60 and student:
                    break
                time.sleep(0.05)
            assert proc.poll() is None, "the flow ended before it could be killed"
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        before = _complete_lines(rows_file)
        killed_at = before.count(b"\n")
        assert 60 <= killed_at < target and restarted

        again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    rows = TEACHER.assert_clean(rows_file, target)  # 0 unparseable, 0 duplicated, only right answers
    assert rows_file.read_bytes().startswith(before)  # 0 lost: every row of the killed run, in place
    assert len(rows) == target
    assert sum(proxy.injected.values()) >= 10 and len(proxy.injected) >= 4, proxy.injected
    assert "resumed from" in again.stdout and "step-" in again.stdout  # the student went on from its checkpoint


@pytest.mark.parametrize("kind, retried", [("429", True), ("5xx", True), ("connection", True), ("timeout", True),
                                           ("malformed", True), ("4xx", False)])
def test_the_health_check_is_retried_on_a_busy_or_restarting_teacher_only(kind, retried):
    """A 429 (busy) or a garbled answer from a teacher that is starting is worth the health task's
    retries; a 4xx (a missing model, a bad key) fails at once with its fix."""
    from mlxcore.clients.chat import TeacherError
    from tasks.distill import _unreachable

    class Failed:
        def result(self):
            raise TeacherError("health check", kind=kind)

    assert _unreachable(None, None, Failed()) is retried
