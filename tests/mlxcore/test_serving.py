"""Serving: the real `mlx_lm server` as a child process on loopback, through `serve_model` and the CLI."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from mlxcore.config import QuantizeConfig
from mlxcore.data.tokenizer import load, train_bpe
from mlxcore.models import checkpoint
from mlxcore.serving import ServeError, serve_model, smoke

from tests.conftest import adapter_checkpoint

REPO = Path(__file__).resolve().parents[2]
PROMPT = "Hello! Who are you?"
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> dict:
    """A tiny llama whose greedy reply to anything is 3 fixed words, a LoRA and a QLoRA adapter on it."""
    from bench.distill_throughput import build_model

    root = tmp_path_factory.mktemp("serve")
    train_bpe(["hello world, the user asks and the assistant answers with words like apple banana cherry"] * 40,
              300, 1, root / "tok")
    info = build_model(root / "model", root / "tok", hidden=64, layers=2, reply_tokens=3)
    return {"root": root, "tok": root / "tok", "model": root / "model", "reply": info["reply"],
            "lora": adapter_checkpoint(root / "lora", root / "model", root / "tok", scale=0.5, seed=3),
            "qlora": adapter_checkpoint(root / "qlora", root / "model", root / "tok", QuantizeConfig(bits=8, group_size=32), scale=0.5, seed=3)}


def greedy_reply(model_dir: Path, tok_dir: Path, prompt: str = PROMPT, max_tokens: int = MAX_TOKENS) -> str:
    """What the checkpoint itself answers (our loader, our greedy loop), for comparison with the server."""
    model, _ = checkpoint.load(model_dir)
    tok = load(tok_dir)
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids, out = tok(text, add_special_tokens=False)["input_ids"], []
    for _ in range(max_tokens):
        token = int(mx.argmax(model(mx.array([ids + out]))[0, -1]))
        if token == tok.eos_token_id:
            break
        out.append(token)
    return tok.decode(out)


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "mlxcore", "serve-model", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_smoke_gets_a_reply_from_the_real_mlx_lm_server(served):
    r = _cli("--model", str(served["model"]), "--smoke", "--prompt", PROMPT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == served["reply"].strip()  # the model's 3 fixed words, then its end of turn
    assert "http://127.0.0.1:" in r.stderr


def test_cli_refuses_a_missing_or_non_model_dir(served, tmp_path):
    r = _cli("--model", str(tmp_path / "nope"), "--smoke")
    assert r.returncode == 2 and "no such directory" in r.stderr and str(tmp_path / "nope") in r.stderr
    r = _cli("--model", str(served["tok"]), "--smoke")
    assert r.returncode == 2 and "not a model dir (no config.json)" in r.stderr


def test_lora_adapters_are_served_on_their_base_with_adapter_path(served):
    want = greedy_reply(served["lora"], served["tok"])
    assert want.strip() != served["reply"].strip()  # the adapters change the answer
    with serve_model(served["lora"]) as server:  # an adapter dir: its base_model + --adapter-path
        assert not server.fuse and server.served_model == served["model"]
        assert server.command()[server.command().index("--adapter-path") + 1] == str(served["lora"])
        got = server.smoke(PROMPT, max_tokens=MAX_TOKENS)
    assert got.strip() == want.strip() and not server.running()


def test_qlora_adapters_are_fused_because_mlx_lm_would_use_the_float_base(served):
    with pytest.raises(ValueError, match="QLoRA"):
        serve_model(served["qlora"], fuse=False)
    # fuse=True (what LoRA gets on request) and the QLoRA default take the same path: checkpoint.fuse to a temp dir
    with serve_model(served["model"], adapter=served["qlora"]) as server:
        fused = server.served_model
        assert server.fuse and "--adapter-path" not in server.command() and (fused / "config.json").is_file()
        got = server.smoke(PROMPT, max_tokens=MAX_TOKENS)
    assert got.strip() == greedy_reply(served["qlora"], served["tok"]).strip()
    assert not fused.exists()  # the fused model went with the server
    lora = serve_model(served["lora"], fuse=True)
    assert lora.fuse and "--adapter-path" not in lora.command()


def test_a_model_that_fails_to_load_fails_fast_with_its_log_tail(served, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (broken / name).write_bytes((served["model"] / name).read_bytes())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ServeError) as e:
        serve_model(broken, wait_s=60).start()
    assert "before answering" in str(e.value) and "Traceback" in str(e.value)


def test_smoke_against_nothing_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ServeError, match=f"127.0.0.1:{port}/v1/chat/completions"):
        smoke(f"http://127.0.0.1:{port}", "default_model", "hi", timeout=5)


_PARENT = """
import subprocess, sys, time
from mlxcore.serving import die_with_parent
sleep = [sys.executable, "-c", "import time; time.sleep(120)"]
guarded = subprocess.Popen(sleep, preexec_fn=die_with_parent, start_new_session=True)
unguarded = subprocess.Popen(sleep, start_new_session=True)
print(guarded.pid, unguarded.pid, flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # an unreaped orphan is dead


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_server_process_dies_with_the_process_that_started_it():
    """serve_model starts mlx_lm.server with `die_with_parent`: when the starting process is SIGKILLed
    (no cleanup runs), the server gets SIGTERM instead of holding its port and memory. The same
    child started without it (the control) outlives its parent."""
    import signal
    import time

    parent = subprocess.Popen([sys.executable, "-c", _PARENT], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[2])
    guarded, unguarded = map(int, parent.stdout.readline().split())
    try:
        assert _alive(guarded) and _alive(unguarded)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while _alive(guarded) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(guarded)
        assert _alive(unguarded)
    finally:
        for pid in (guarded, unguarded):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
