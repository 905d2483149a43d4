"""Serve a checkpoint over the OpenAI API with mlx-lm's own server, on loopback, as a child process.

    with serve_model(model_dir) as server:          # or an adapter dir, or model=base, adapter=dir
        print(smoke(server.url, server.model_id, "Hello"))

`serve_model(model, *, adapter=None, host="127.0.0.1", port=0, fuse=None, wait_s=180)` starts
`python -m mlx_lm server --model M [--adapter-path A] --host H --port P` (the form mlx-lm 0.32
documents; `python -m mlx_lm.server` still works but prints a deprecation notice) and waits
until `GET /v1/models` answers and a one-token completion comes back (mlx-lm loads the model in
a thread of its own, after its HTTP socket is up). It stops the server on exit: SIGTERM (the
server holds no state to flush; its SIGINT path spends a second joining threads), then SIGKILL
of its process group after 10 s.

If the server exits, logs a traceback (mlx-lm keeps running when its socket cannot bind or the
model fails to load) or is not ready within `wait_s`, `ServeError` says so with the tail of its
log. `port=0` picks a free loopback port (and retries with another when the port was taken in
between). The child runs with HF_HUB_OFFLINE=1 (a local model never needs the network), with the
fast BLAS mlxcore found (LD_PRELOAD, as mlxcore loads it in process), and on Linux it is stopped
when the thread that started it dies.

Requests name the model "default_model" (`server.model_id`): that is the name mlx-lm maps to
`--model` *and* `--adapter-path`; a request naming the model's path would be served without
the adapters.

Adapter dirs (LoRA / DoRA / QLoRA, mlx-lm's adapter layout plus our `base_model` key):

  fuse=None (default)  LoRA / DoRA: `--model <base_model> --adapter-path <dir>`: mlx-lm builds
                       the same LoRA/DoRA layers on the base (our adapter dirs are its layout),
                       nothing is written, start-up is as fast as for the base.
                       QLoRA (a `quantize` entry): fused into a temp dir first, because mlx-lm
                       would put the adapters on the *unquantized* base, which is not the model
                       that was trained (the fused model is: the dequantized 4/8-bit base + the
                       adapters, exactly `checkpoint.fuse`).
  fuse=True            always fuse into a temp dir (removed on stop): a plain model, what other
                       tools would load too.
  fuse=False           never fuse (QLoRA is then refused with the reason above).

`smoke(url, model, prompt)` sends one chat completion (`POST /v1/chat/completions`, greedy, via
httpx) and returns the reply text.

This module starts a process and talks HTTP; it imports MLX only to fuse, and never Prefect.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlxcore.models.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS, is_adapter_dir

MODEL_ID = "default_model"


class ServeError(RuntimeError):
    """The server could not be started or did not answer; the message carries its log tail."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _check_model_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} {path}: no such directory")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{what} {path}: not a model dir (no config.json)")
    if not any(path.glob("model*.safetensors")):
        raise FileNotFoundError(f"{what} {path}: no model*.safetensors weights")


def _check_adapter_dir(path: Path) -> dict:
    if not path.is_dir():
        raise FileNotFoundError(f"adapter {path}: no such directory")
    if not is_adapter_dir(path) or not (path / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(f"adapter {path}: not an adapter dir ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})")
    return json.loads((path / ADAPTER_CONFIG).read_text())


def _libc_prctl():
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except Exception:  # not glibc / musl: no parent-death signal
        return None


# Looked up here, in the parent: between fork and exec the child must not import or dlopen (a lock
# another thread of the parent held at the fork would never be released there).
_PRCTL = _libc_prctl() if sys.platform.startswith("linux") else None


def die_with_parent():  # a preexec_fn: runs in the child between fork and exec
    """SIGTERM this child when the process that started it dies (Linux), so a killed parent
    leaves no server behind."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _model_type(path: Path) -> str | None:
    try:
        return json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None


class serve_model:
    """A running `mlx_lm server` (see the module doc); a context manager, or call start() / stop()."""

    def __init__(self, model, *, adapter=None, host: str = "127.0.0.1", port: int = 0, fuse: bool | None = None,
                 wait_s: float = 180.0, log_level: str = "WARNING", max_tokens: int | None = None) -> None:
        model = Path(model)
        if adapter is None and is_adapter_dir(model):
            model, adapter = None, model
        self.adapter = Path(adapter) if adapter is not None else None
        self.acfg = _check_adapter_dir(self.adapter) if self.adapter is not None else None
        if model is None:
            base = self.acfg.get("base_model")
            if not base:
                raise FileNotFoundError(f"adapter {self.adapter}: {ADAPTER_CONFIG} names no base_model; "
                                        "pass the base as model and the adapter dir as adapter")
            model = Path(base)
        _check_model_dir(model, "base model" if self.adapter is not None else "model")
        qlora = bool(self.acfg and self.acfg.get("quantize"))
        if fuse is False and qlora:
            raise ValueError(f"adapter {self.adapter} was trained on a {self.acfg['quantize'].get('bits')}-bit "
                             "quantized base (QLoRA): mlx_lm.server would apply it to the unquantized base; "
                             "serve it fused (fuse=True or the default)")
        self.fuse = self.adapter is not None and (fuse is True or (fuse is None and qlora))
        self.model = model
        self.host, self.port, self.wait_s = host, port, wait_s
        self.log_level, self.max_tokens = log_level, max_tokens
        self.proc: subprocess.Popen | None = None
        self.served_model: Path = model
        self._tmp: Path | None = None
        self._log = None
        self.log_path: Path | None = None

    # ------------------------------------------------------------------ life cycle

    @property
    def url(self) -> str:
        return f"http://{self.host if ':' not in self.host else f'[{self.host}]'}:{self.port}"

    model_id = MODEL_ID

    def __enter__(self) -> "serve_model":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "serve_model":
        if self.proc is not None:
            return self
        self._tmp = Path(tempfile.mkdtemp(prefix="mlxcore-serve-"))
        self.log_path = self._tmp / "server.log"
        try:
            if self.fuse:
                from mlxcore.models.checkpoint import fuse

                self.served_model = fuse(self.adapter, self._tmp / "fused")
            chosen = self.port
            for attempt in range(3):
                self.port = chosen or free_port(self.host)
                self._spawn()
                try:
                    self.wait()
                    return self
                except ServeError as e:
                    if chosen or "address already in use" not in str(e).lower() or attempt == 2:
                        raise
        except BaseException:
            self.stop()
            raise
        return self

    def command(self) -> list[str]:
        # our retention checkpoints: mlx-lm's CLI with that model type registered (models/mlx_lm_cli.py)
        cli = "mlxcore.models.mlx_lm_cli" if _model_type(Path(self.served_model)) == "retention" else "mlx_lm"
        cmd = [sys.executable, "-m", cli, "server", "--model", str(self.served_model),
               "--host", self.host, "--port", str(self.port), "--log-level", self.log_level]
        if self.adapter is not None and not self.fuse:
            cmd += ["--adapter-path", str(self.adapter)]
        if self.max_tokens:
            cmd += ["--max-tokens", str(self.max_tokens)]
        return cmd

    def _env(self) -> dict:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONUNBUFFERED": "1"}
        import mlxcore

        blas = mlxcore.BLAS
        if blas.path and blas.name in ("mkl", "openblas", "custom"):
            env["LD_PRELOAD"] = " ".join(filter(None, [blas.path, env.get("LD_PRELOAD")]))
        return env

    def _spawn(self) -> None:
        self._stop_process()
        self._log = open(self.log_path, "ab")
        self._log.write(f"$ {' '.join(self.command())}\n".encode())
        self._log.flush()
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, env=self._env(), start_new_session=True,
                                     preexec_fn=die_with_parent if _PRCTL is not None else None)

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:].strip() if self.log_path else ""
        except OSError:
            return ""

    def _failure(self) -> str | None:
        """Why the server cannot serve, if it has visibly failed: it exited, or a thread of it died
        (mlx-lm keeps running when its HTTP socket cannot bind or its model fails to load)."""
        if self.proc.poll() is not None:
            return f"exited with code {self.proc.returncode}"
        try:
            with open(self.log_path, "rb") as f:
                if b"Traceback (most recent call last)" in f.read():
                    return "failed (a traceback in its log)"
        except OSError:
            pass
        return None

    def wait(self) -> float:
        """Block until GET /v1/models answers 200 and a one-token completion comes back (the model is
        loaded and generates); seconds waited. ServeError (with the log tail) if it fails or times out."""
        import threading

        import httpx

        started = time.monotonic()
        probe: dict = {}

        def warm_up(client: httpx.Client) -> None:
            try:
                probe["response"] = client.post("/v1/completions", json={
                    "model": MODEL_ID, "prompt": "ping", "max_tokens": 1, "temperature": 0.0}, timeout=self.wait_s)
            except Exception as e:  # reported by the waiting loop
                probe["error"] = e

        with httpx.Client(base_url=self.url, timeout=2, trust_env=False) as client:
            warming: threading.Thread | None = None
            while True:
                failure = self._failure()
                if failure is not None:
                    raise ServeError(f"mlx_lm server for {self.served_model} {failure} before answering on "
                                     f"{self.url}:\n{self.log_tail()}")
                if time.monotonic() - started > self.wait_s:
                    raise ServeError(f"mlx_lm server for {self.served_model} did not answer on {self.url} within "
                                     f"{self.wait_s:.0f} s:\n{self.log_tail()}")
                if warming is None:
                    try:
                        if client.get("/v1/models").status_code == 200:
                            warming = threading.Thread(target=warm_up, args=(client,), daemon=True)
                            warming.start()
                            continue
                    except httpx.HTTPError:
                        pass
                    time.sleep(0.1)
                    continue
                warming.join(0.1)
                if warming.is_alive():
                    continue
                r = probe.get("response")
                if r is not None and r.status_code == 200:
                    return time.monotonic() - started
                said = f"HTTP {r.status_code}: {r.text[:300]}" if r is not None else repr(probe.get("error"))
                raise ServeError(f"mlx_lm server for {self.served_model} answers on {self.url} but cannot generate "
                                 f"({said}):\n{self.log_tail()}")

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _stop_process(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # its own session: only what we started
                except ProcessLookupError:
                    pass
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self) -> None:
        """Stop the server and remove its temp dir (log, fused model)."""
        self._stop_process()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def smoke(self, prompt: str = "Hello", *, max_tokens: int = 32, timeout: float = 300.0) -> str:
        """`smoke()` against this server; a failure carries the server's log tail."""
        try:
            return smoke(self.url, self.model_id, prompt, max_tokens=max_tokens, timeout=timeout)
        except ServeError as e:
            state = "running" if self.running() else f"exited with code {self.proc.returncode if self.proc else '?'}"
            raise ServeError(f"{e}\nserver ({state}) log:\n{self.log_tail()}") from None


def smoke(url: str, model: str = MODEL_ID, prompt: str = "Hello", *, max_tokens: int = 32,
          timeout: float = 300.0) -> str:
    """One greedy chat completion from an OpenAI-compatible server at `url`; the reply text."""
    import httpx

    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0.0, "top_p": 1.0, "stream": False}
    endpoint = url.rstrip("/") + "/v1/chat/completions"
    try:
        with httpx.Client(timeout=timeout, trust_env=False) as client:
            r = client.post(endpoint, json=body)
    except httpx.TimeoutException:
        raise ServeError(f"{endpoint}: no reply within {timeout:.0f} s") from None
    except httpx.HTTPError as e:
        raise ServeError(f"{endpoint}: {type(e).__name__}: {e}") from None
    if r.status_code != 200:
        raise ServeError(f"{endpoint}: HTTP {r.status_code}: {r.text[:500]}")
    try:
        return r.json()["choices"][0]["message"]["content"] or ""
    except (ValueError, KeyError, IndexError, TypeError):
        raise ServeError(f"{endpoint}: not a chat completion: {r.text[:500]}") from None
