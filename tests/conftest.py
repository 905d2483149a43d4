"""Shared fixtures: one Prefect test server per session, small real datasets built once.

Nothing here touches the network: data is synthetic or comes from $MLXFLOW_TEST_DATA (set by
.ci/run to ../shared/data); tests that need the latter skip cleanly without it.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# Before anything imports prefect: a private Prefect home (results, cache records, DB) per
# session, and no telemetry (the machine may be offline).
_HOME = tempfile.mkdtemp(prefix="mlxflow-prefect-home-")
atexit.register(shutil.rmtree, _HOME, ignore_errors=True)
os.environ["PREFECT_HOME"] = _HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ["PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW"] = "ignore"
os.environ["HF_HUB_OFFLINE"] = "1"
# `mlxflow serve` and `prefect worker start` look for due runs every 10 s by default; the deployment
# tests wait on that, so their processes look every 2 s (what the runs do is the same).
os.environ.setdefault("PREFECT_RUNNER_POLL_FREQUENCY", "2")
os.environ.setdefault("PREFECT_WORKER_QUERY_SECONDS", "2")
# Equivalence tests compare float32 results: on CUDA, MLX would run float32 matmuls in TF32.
os.environ.setdefault("MLX_ENABLE_TF32", "0")
# Under pytest-xdist (`-n 3` for the suite, `-n 2` for the quick subset) each worker, and every process it starts, uses
# one BLAS thread and one fused-kernel thread: two 2-thread OpenMP teams on two cores spin at
# their barriers, and two workers each fanning kernels out over both cores ran the RL learning
# tests 1.45x slower (91.7 s vs 63.1 s for two of them, measured).
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _var in ("MKL_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MLXFLOW_KERNEL_THREADS"):
        os.environ.setdefault(_var, "1")
    # MLX-CUDA compiles each kernel on first use and caches it in MLX_PTX_CACHE_DIR (default
    # <tmp>/mlx/<version>/ptx), writing the files in place: one worker could read another's
    # half-written kernel. Each worker keeps a folder of its own there, so the GPU subset compiles
    # on many workers at once (`pytest -m gpu -n 8` on a GPU host; see the README's GPU subset),
    # and on CUDA copies in the kernels other workers have finished (`pytest_configure`).
    import importlib.metadata as _md

    try:
        _ptx = os.environ.get("MLX_PTX_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "mlx", _md.version("mlx"), "ptx")
        os.environ["MLX_PTX_CACHE_DIR"] = os.path.join(_ptx, os.environ["PYTEST_XDIST_WORKER"])
    except _md.PackageNotFoundError:
        pass

import pytest  # noqa: E402

# Tests that share an expensive session fixture run on one xdist worker (`--dist loadgroup`), so
# each such fixture is built once per run, not once per worker.
_GROUPS = (("smoke", ("smoke_pipeline",)), ("sort", ("sort_sft", "sort_reward_model")))

from mlxcore.config import ModelConfig, RewardModelRunConfig, SyntheticConfig, TokenizerConfig, TrainConfig  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    """With `-m gpu`: the long tests start first (`GpuSubsetOrder`). On an xdist worker with a
    CUDA GPU: take in the kernels other workers finish compiling (tests/ptx_share.py), so each
    kernel is compiled about once per run, not once per worker."""
    import mlx.core as mx

    if "gpu" in (config.option.markexpr or ""):
        config.pluginmanager.register(GpuSubsetOrder(), "mlxflow-gpu-subset-order")
    own = os.environ.get("MLX_PTX_CACHE_DIR") if os.environ.get("PYTEST_XDIST_WORKER") else None
    if own and hasattr(mx, "cuda") and mx.cuda.is_available():
        from tests.ptx_share import start

        start(Path(own))


@pytest.hookimpl(tryfirst=True)  # before xdist reads the xdist_group marks (--dist loadgroup)
def pytest_collection_modifyitems(config, items):
    """End-to-end flows (tests/flows) and benchmark scripts (tests/bench) are `slow`: the quick
    subset, `pytest -m "not slow"`, is the library's tests (a few minutes on 2 cores)."""
    for item in items:
        if Path(str(item.fspath)).resolve().parent.name in ("flows", "bench"):
            item.add_marker(pytest.mark.slow)
        group = next((g for g, names in _GROUPS if any(n in item.fixturenames for n in names)), None)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))


class GpuSubsetOrder:
    """With `-m gpu`: `order_gpu_subset` after `-m` has deselected the rest (trylast), so the
    chunks are laid out over the tests xdist will schedule."""

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config, items):
        order_gpu_subset(config, items)


def order_gpu_subset(config, items) -> None:
    """Start each `gpu(first=True)` test at once, on a worker of its own.

    On a cold MLX-CUDA kernel cache, QLoRA's quantized matmuls are the longest chains of compiles
    (20-30 s each, one after another in one test). Without xdist they simply go first. Under
    xdist's load scheduling each worker is first sent a chunk of consecutive tests (at least two),
    so sorting alone handed two of them to one worker, one after the other (a cold H100 run: 148 s
    behind 66 s on one worker, `[qlora8]` behind `[qlora4]` on another, cut off at 300 s). So each
    one opens a chunk of its own, filled with tests in their collected order.
    """
    first = [item for item in items if any(m.kwargs.get("first") for m in item.iter_markers("gpu"))]
    rest = [item for item in items if item not in first]
    workers = getattr(config, "workerinput", {}).get("workercount", 0)
    if workers and len(items) >= 2 * workers:  # else xdist sends the tests round-robin, one at a time
        # xdist.scheduler.load.LoadScheduling.schedule's first chunk size
        chunk = max(min(len(items) // workers // 4, config.getoption("maxschedchunk") or len(items)), 2)
        spread = []
        for item in first[:workers]:
            spread += [item, *rest[:chunk - 1]]
            del rest[:chunk - 1]
        first = spread + first[workers:]
    items[:] = first + rest


def micro_model() -> ModelConfig:
    """A 2-layer model small enough that a training step takes milliseconds."""
    return ModelConfig(preset="custom", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)


def quick_train(**overrides) -> TrainConfig:
    base = dict(steps=20, batch_size=8, seq_len=64, lr=3e-3, warmup_steps=2, eval_every=10,
                eval_batches=2, save_every=10, log_every=5)
    return TrainConfig(**{**base, **overrides})


def kill_after_first_checkpoint(job, tmp_path: Path) -> int:
    """Start `python -m mlxcore.train.launch` on `job`, SIGKILL it once a checkpoint exists; its step."""
    import signal
    import subprocess
    import sys
    import time

    from mlxcore.models import checkpoint

    out = Path(job.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (tmp_path / "job.json").write_text(job.model_dump_json())
    proc = subprocess.Popen([sys.executable, "-m", "mlxcore.train.launch", str(tmp_path / "job.json")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not checkpoint.list_checkpoints(out / "checkpoints") and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (out / "model").exists(), "the run finished before it could be killed"
    return checkpoint.list_checkpoints(out / "checkpoints")[-1][0]


def stop_group(proc, sig=None, timeout: float = 30) -> None:
    """Stop a process started with start_new_session=True and its children (SIGINT, then SIGKILL)."""
    import signal
    import subprocess

    os.killpg(proc.pid, sig or signal.SIGINT)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_deployment(deployment: str, args: list[str], config_dir: Path | None = None, timeout: float = 300):
    """What a user types in two shells: `mlxflow serve [CONFIG_DIR]`, then `prefect deployment run
    DEPLOYMENT ARGS --watch` against the session's Prefect server. Returns the second's CompletedProcess;
    when it fails, its stderr ends with what the serve process printed (the flow run's own traceback)."""
    import subprocess
    import sys
    import tempfile
    import time

    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: nobody reads it while it runs
        serve = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", *([str(config_dir)] if config_dir else [])],
                                 cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, text=True,
                                 start_new_session=True)
        try:
            deadline = time.time() + 120
            while time.time() < deadline:  # the serve process registers the deployments first
                ls = subprocess.run([sys.executable, "-m", "prefect", "deployment", "ls"], env=env,
                                    capture_output=True, text=True)
                if deployment in ls.stdout:
                    break
                time.sleep(1)
            done = subprocess.run([sys.executable, "-m", "prefect", "deployment", "run", deployment, *args, "--watch",
                                   "--watch-timeout", str(int(timeout)), "--watch-interval", "1"],
                                  env=env, capture_output=True, text=True, timeout=timeout + 60)
        finally:
            stop_group(serve)
        if done.returncode != 0:
            log.seek(0)
            done.stderr += "\n--- mlxflow serve printed ---\n" + log.read()[-20000:]
        return done


# configs/smoke.yaml cut to a few seconds a stage: enough for a new architecture to show that
# every stage runs and its held-out loss falls (tests/flows/test_moe_pipeline.py, test_retention_pipeline.py).
SMOKE_MINI = ["data.synthetic.pretrain_docs=1000", "data.synthetic.sft_examples=300", "data.synthetic.val_examples=40",
              "pretrain.steps=16", "pretrain.seq_len=64", "pretrain.eval_every=8", "pretrain.eval_batches=2",
              "pretrain.save_every=0", "sft.steps=6", "sft.seq_len=64", "sft.batch_size=8", "sft.eval_every=3",
              "sft.eval_batches=2", "sft.save_every=0", "sample.num_prompts=1", "sample.max_tokens=8"]


def run_learning_pipeline(config) -> tuple:
    """The pipeline flow in this process (the session's Prefect server): it completes and each
    training stage's held-out loss falls. (flow run id, result, the final checkpoint's config.json)."""
    import json

    from flows.pipeline import pipeline

    state = pipeline(config, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    for stage in ("pretrain", "sft"):
        train = result["train"][stage]
        assert train["val_loss"] < train["initial_val_loss"], (stage, train)
    return state.state_details.flow_run_id, result, json.loads((Path(result["checkpoint"]) / "config.json").read_text())


def tiny_hf_config(model_type: str = "qwen3", vocab_size: int = 512) -> dict:
    """The config.json of a tiny 2-layer qwen2 / qwen3 model (float32)."""
    common = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=vocab_size, max_position_embeddings=1024,
                  rope_theta=1e6, torch_dtype="float32")
    configs = {
        "qwen2": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], tie_word_embeddings=True),
        "qwen3": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], head_dim=16, tie_word_embeddings=False),
    }
    return {**common, **configs[model_type]}


def hf_model_dir(path: Path, tokenizer_dir: Path, model_type: str = "qwen3", vocab_size: int = 512) -> Path:
    """A tiny model in the layout Hugging Face / mlx-lm write (config.json, model.safetensors, tokenizer)."""
    from mlxcore.models import checkpoint
    from mlxcore.models.model import from_config

    config = tiny_hf_config(model_type, vocab_size)
    checkpoint.save_model_dir(path, from_config(config), config, tokenizer_dir=tokenizer_dir)
    (path / "manifest.json").unlink()  # as downloaded: no manifest of ours
    return path


def adapter_checkpoint(path: Path, base: Path, tokenizer_dir: Path, quantize=None, scale: float = 0.05,
                       seed: int = 1) -> Path:
    """A LoRA (QLoRA with `quantize`) checkpoint of `base` as training writes it, with random non-zero
    adapters of size `scale`, so the adapted model differs from its base."""
    import mlx.core as mx

    from mlxcore.config import LoRAConfig
    from mlxcore.models import adapters, checkpoint

    model, config = checkpoint.load(base)
    acfg = adapters.prepare(model, TrainConfig(fine_tune_type="lora", lora=LoRAConfig(rank=4), quantize=quantize))
    mx.random.seed(seed)
    for _, m in model.named_modules():
        if hasattr(m, "lora_b"):
            m.lora_b = scale * mx.random.normal(m.lora_b.shape)
    return checkpoint.save(path, model, config, {"step": 1}, tokenizer_dir=tokenizer_dir,
                           adapter_config=acfg | {"base_model": str(base)})


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """The session's Prefect server: a real `prefect server start` with its UI, on loopback, that
    in-process flows report to. The UI test browses the runs other tests made (the smoke pipeline's),
    so no test runs a pipeline only to look at it. Yields the base URL (the API is base + "/api")."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tests.prefect_ui import start_prefect_server

    base, server = start_prefect_server(tmp_path_factory.mktemp("prefect-server"))
    try:
        with temporary_settings(updates={PREFECT_API_URL: f"{base}/api"}):
            yield base
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=5)  # the runs' last log lines, before the server goes
    finally:
        stop_group(server)


@pytest.fixture(scope="session")
def mlx_lm_server(tmp_path_factory, small_data):
    """A real mlx_lm.server on loopback (OpenAI API) serving a tiny model built here, whose greedy
    reply to anything is 3 fixed words and the end of its turn: (base URL, model dir)."""
    from bench.distill_throughput import Server, build_model

    work = tmp_path_factory.mktemp("served")
    build_model(work / "model", small_data["tok"], hidden=64, layers=2, reply_tokens=3)
    with Server(work / "model", work) as server:
        server.wait_ready()
        yield server.url, work / "model"


@pytest.fixture(scope="session")
def test_data() -> Path:
    path = os.environ.get("MLXFLOW_TEST_DATA")
    if not path or not Path(path).is_dir():
        pytest.skip("MLXFLOW_TEST_DATA is not set (real test data lives in ../shared/data)")
    return Path(path)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> dict[str, Path]:
    """Raw synthetic data, a 512-token BPE, and pretrain + SFT shards, built once."""
    from mlxcore.data import pretokenize, synthetic, tokenizer

    root = tmp_path_factory.mktemp("small-data")
    synthetic.write_dataset(SyntheticConfig(pretrain_docs=1500, sft_examples=600, val_examples=80), root / "raw")
    tokenizer.load_or_train(TokenizerConfig(vocab_size=512), root / "raw", root / "tok")
    pretokenize.pretokenize(root / "raw", root / "tok", "pretrain", root / "pretrain")
    pretokenize.pretokenize(root / "raw", root / "tok", "sft", root / "sft")
    return {k: root / k for k in ("raw", "tok", "pretrain", "sft")}


@pytest.fixture(scope="session")
def smoke_pipeline(tmp_path_factory, prefect_server) -> dict:
    """One uninterrupted run of configs/smoke.yaml (in this process, on the session's Prefect server),
    shared by the pipeline and kill/re-run tests: its root, config, flow run id, result and the
    sha256 of its final pretrain / sft weights, taken right after the run."""
    import hashlib

    from flows.pipeline import pipeline
    from mlxcore.config import load_config

    root = tmp_path_factory.mktemp("pipeline")
    config = load_config(REPO / "configs/smoke.yaml", [f"out_dir={root}"])
    state = pipeline(config, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    weights = {stage: hashlib.sha256((Path(result["train"][stage]["checkpoint"]) / "model.safetensors").read_bytes()).hexdigest()
               for stage in ("pretrain", "sft")}
    return {"root": root, "config": config, "flow_run_id": state.state_details.flow_run_id, "result": result,
            "weights": weights}


@pytest.fixture(scope="session")
def sort_sft(tmp_path_factory) -> str:
    """A 4-layer model pretrained and SFT'd on sorting eight digits: right on some lists, not most
    (the start of the preference and PPO tests)."""
    from mlxcore.data import pretokenize, synthetic, tokenizer
    from mlxcore.train.loop import TrainJob, run

    root = tmp_path_factory.mktemp("sort-sft")
    synthetic.write_dataset(SyntheticConfig(pretrain_docs=4000, sft_examples=2000, val_examples=100, tasks=["sort"]),
                            root / "raw")
    tokenizer.load_or_train(TokenizerConfig(vocab_size=512), root / "raw", root / "tok")
    for kind, out in (("pretrain", "pt"), ("sft", "sd")):
        pretokenize.pretokenize(root / "raw", root / "tok", kind, root / out, progress_bar=False)
    model = ModelConfig(preset="custom", hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                        intermediate_size=352)
    run(TrainJob(data_dir=str(root / "pt"), tokenizer_dir=str(root / "tok"), out_dir=str(root / "pre"), model=model,
                 train=TrainConfig(steps=400, batch_size=16, lr=3e-3, warmup_steps=10, eval_every=0, save_every=0)))
    run(TrainJob(data_dir=str(root / "sd"), tokenizer_dir=str(root / "tok"), out_dir=str(root / "sft"),
                 init_from=str(root / "pre/model"),
                 train=TrainConfig(steps=60, batch_size=16, lr=1e-3, warmup_steps=5, eval_every=0, save_every=0)))
    return str(root / "sft/model")


@pytest.fixture(scope="session")
def sort_reward_model(sort_sft, prefect_server, tmp_path_factory) -> dict:
    """The `reward-model` flow on `sort_sft`'s decoder, on synthetic sort pairs (the right sort vs a
    near miss): its result (checkpoint, eval, train), asserted on in tests/flows/test_preference.py."""
    from flows.preference import reward_model

    cfg = RewardModelRunConfig.model_validate({
        "name": "rm", "out_dir": str(tmp_path_factory.mktemp("sort-rm")), "init_from": sort_sft,
        "synthetic": {"train_examples": 8000, "val_examples": 200}, "dense_weight": 5.0,
        "train": {"steps": 750, "batch_size": 16, "seq_len": 64, "lr": 3e-4, "warmup_steps": 10, "eval_every": 375,
                  "eval_batches": 2, "save_every": 375, "weight_decay": 0.0, "pad_multiple": 16}})
    state = reward_model(cfg, [], return_state=True)
    assert state.is_completed(), state.message
    return state.result()
