"""Export stages: GGUF (+ Ollama Modelfile), quantized MLX, the llama.cpp parity gate, the hub upload.

Each export is content-keyed on the model dir it ships (its manifest digest), the format and the
code, so a re-run is a cache hit and a retrained model is exported again. The gate is keyed on
both answer sets and the GGUF; a failed gate writes no stage dir (the next run checks again) and,
with `gate.fail`, fails the task and so the flow.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact

from mlxcore.clients.secrets import resolve_api_key
from mlxcore.config import HubPushConfig, ParityGateConfig
from mlxcore.export import gguf as gguf_export
from mlxcore.export import hub, mlx_quant, ollama, parity
from mlxcore.io import atomic_dir, read_manifest, write_json, write_manifest
from mlxcore.models import card
from tasks.caching import Stage
from tasks.progress import artifact_key, progress_bar
from tasks.runlog import HOOKS
from tasks.secrets import prefect_secret

GGUF = Stage("export-gguf", inputs=("model_dir",))
MLX = Stage("export-mlx", inputs=("model_dir",), product="model")
GATE = Stage("parity-gate", inputs=("model_dir", "gguf_dir", "checkpoint_answers", "gguf_answers"))


@GGUF.task(task_run_name="export-gguf-{qtype}")
def export_gguf(model_dir: str, qtype: str, modelfile: bool, run_dir: str) -> dict:
    """`model_dir` as one GGUF file (llama.cpp's metadata and vocabulary) and, with `modelfile`, an Ollama Modelfile."""
    out = GGUF.dir(locals())
    name = f"{Path(run_dir).name}-{qtype}.gguf"
    if not GGUF.done(out):
        with atomic_dir(out) as tmp:
            with progress_bar(1, f"export gguf {qtype}", "tensor") as bar:
                info = gguf_export.export_gguf(model_dir, tmp / name, qtype, name=Path(run_dir).name,
                                               on_progress=bar)
            if modelfile:
                ollama.write_bundle(tmp / name, model_dir, tmp)
            card.export_card(model_dir, tmp, "gguf", ["gguf", qtype])  # the model's card, for a hub push
            write_manifest(tmp, "export-gguf", {k: v for k, v in info.items() if k != "path"} | {"file": name})
    return {"path": str(out), "gguf": str(out / name), **_summary(out)}


@MLX.task(task_run_name="export-mlx-{bits}bit")
def export_mlx(model_dir: str, bits: int, group_size: int, run_dir: str) -> dict:
    """`model_dir` quantized to `bits` in the layout `mlx_lm.load` reads (`<dir>/model`)."""
    out = MLX.dir(locals())
    if not MLX.done(out):
        with atomic_dir(out) as tmp:
            info = mlx_quant.export_mlx_quantized(model_dir, tmp / "model", bits=bits, group_size=group_size)
            card.export_card(model_dir, tmp / "model", "mlx", ["mlx", f"{bits}-bit"])
            write_json(tmp / "export.json", {k: v for k, v in info.items() if k != "path"})
    return {"path": str(out), "model": str(out / "model"), "bits": bits, "group_size": group_size}


def _summary(out: Path) -> dict:
    return {k: v for k, v in read_manifest(out)["config"].items() if k in ("qtype", "bytes", "seconds", "arch", "pre")}


def _read_rows(answers_dir: str) -> list[dict]:
    with open(Path(answers_dir) / "answers.jsonl") as f:
        return [json.loads(line) for line in f]


@GATE.task(task_run_name="parity-gate-{qtype}")
def parity_gate(model_dir: str, gguf_dir: str, gguf_file: str, qtype: str, gate: ParityGateConfig,
                checkpoint_answers: str, gguf_answers: str, text: list[str], run_dir: str) -> dict:
    """llama.cpp's token ids and greedy bench accuracy vs the checkpoint's; fails the flow on a difference."""
    out = GATE.dir(locals())
    if GATE.done(out):
        return json.loads((out / "parity.json").read_text()) | {"path": str(out)}
    started = time.perf_counter()
    result = parity.gate(model_dir, gguf_file, qtype, gate, _read_rows(checkpoint_answers), _read_rows(gguf_answers),
                         text)
    result["seconds"] = round(time.perf_counter() - started, 2)
    title = f"parity {Path(run_dir).name} {qtype}"
    md = parity.markdown(result, title)
    create_markdown_artifact(markdown=md, key=artifact_key(Path(run_dir).name, "parity", qtype),
                             description=f"{title}: llama.cpp vs the checkpoint")
    if not result["passed"] and gate.fail:
        raise parity.ParityError(f"the {qtype} GGUF {gguf_file} failed the parity gate: " + "; ".join(result["reasons"]))
    with atomic_dir(out) as tmp:
        write_json(tmp / "parity.json", result)
        (tmp / "parity.md").write_text(md)
        write_manifest(tmp, "parity-gate", {"qtype": qtype, "passed": result["passed"]})
    return result | {"path": str(out)}


@task(retries=2, retry_delay_seconds=5, **HOOKS)
def push_exports(uploads: list[tuple[str, str, list[str]]], push: HubPushConfig, run_dir: str) -> dict:
    """Upload (folder, path in the repo, only these files: globs, or [] for all) to one hub model repo:
    the GGUF files and the first format's Modelfile and card at the top, each MLX export in `mlx-<bits>bit/`."""
    token = resolve_api_key(push.api_key_env, push.api_key_secret, default_env="HF_TOKEN", resolver=prefect_secret,
                            who=f"hub repo {push.repo_id}")
    commits = [hub.push(folder, push.repo_id, token=token, endpoint=push.endpoint, private=push.private,
                        revision=push.revision, path_in_repo=path_in_repo, ignore=["manifest.json"], allow=allow,
                        commit_message=f"mlxflow export of {Path(run_dir).name}")
               for folder, path_in_repo, allow in uploads]
    return {"repo_id": push.repo_id, "commits": commits}
