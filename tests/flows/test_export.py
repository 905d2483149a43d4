"""Shipping a trained model: the `export` flow and `mlxcore export` on the smoke pipeline's model,
checked by llama.cpp itself (llama-cpp-python) and by `mlx_lm.load`.

The same gate runs on the MiniMind-tokenizer GSM8K fine-tune (tests/flows/test_real_data.py) and
on a LoRA fine-tune of a local qwen3-layout model (tests/flows/test_finetune.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mlxcore.config import ExportRunConfig

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.usefixtures("prefect_server")

TOLERANCE = {"f16": 1.0, "q8_0": 2.0}


def _gate_text(test_data_dir: str | None) -> list[str]:
    """1 MB of real text for the tokenizers to agree on (tinyshakespeare), when the test data is here."""
    if not test_data_dir:
        return []
    path = Path(test_data_dir) / "tinyshakespeare"
    return [str(path)] if path.exists() else []


def _export(tmp_path, model: str, **over):
    from flows.export import export

    cfg = {"name": "ship", "out_dir": str(tmp_path), "model": model,
           "formats": ["f16", "q8_0", "q4_0", "mlx-4bit", "mlx-8bit"],
           "gate": {"examples": 12, "text": _gate_text(__import__("os").environ.get("MLXFLOW_TEST_DATA"))}} | over
    return export(ExportRunConfig.model_validate(cfg), return_state=True)


def test_every_format_ships_and_the_gguf_answers_like_the_checkpoint(smoke_pipeline, tmp_path):
    """f16 / q8_0 / q4_0 GGUF (each with a Modelfile) and MLX 4 / 8-bit from the smoke pipeline's
    model: llama.cpp's token ids equal ours everywhere, f16 answers equal the checkpoint's on >= 95%
    of the bench questions, suite accuracy within the tolerances, MLX exports load in mlx_lm."""
    import mlx_lm

    model = smoke_pipeline["result"]["checkpoint"]
    state = _export(tmp_path, model)
    assert state.is_completed(), state.message
    out = state.result()
    for q in ("f16", "q8_0", "q4_0"):
        gate = out["gates"][q]
        assert gate["passed"] and gate["tokens"]["differing_texts"] == 0, gate["reasons"]
        assert Path(out["gguf"][q]["gguf"]).stat().st_size == out["gguf"][q]["bytes"]
        assert 'PARAMETER stop "<|im_end|>"' in (Path(out["gguf"][q]["path"]) / "Modelfile").read_text()
    tokens = out["gates"]["f16"]["tokens"]
    text = _gate_text(__import__("os").environ.get("MLXFLOW_TEST_DATA"))
    assert tokens["texts"] > (250 if text else 80) and (not text or tokens["tokens"] > 250_000)  # 1 MB: ~300k tokens
    assert out["gates"]["f16"]["identical"] >= 0.95
    for q, tol in TOLERANCE.items():
        assert all(s["drop"] <= tol for s in out["gates"][q]["suites"].values()), out["gates"][q]["suites"]
    sizes = [out["gguf"][q]["bytes"] for q in ("f16", "q8_0", "q4_0")]
    assert sizes == sorted(sizes, reverse=True)
    # the quantized MLX exports load in mlx-lm and are in the bench report beside the GGUFs
    for bits in (4, 8):
        model_obj, _ = mlx_lm.load(out["mlx"][bits]["model"])
        assert json.loads((Path(out["mlx"][bits]["model"]) / "config.json").read_text())["quantization"]["bits"] == bits
    report = json.loads((Path(out["bench"]["path"]) / "report.json").read_text())
    assert set(report["overall"]) == {"ship", "ship-f16", "ship-q8_0", "ship-q4_0", "ship-mlx4", "ship-mlx8"}
    assert all(r["n"] == 7 * 12 for r in report["overall"].values())

    # a second run is all cached: no export, gate or answer is redone
    again = _export(tmp_path, model)
    assert again.is_completed() and again.result()["gguf"]["f16"]["gguf"] == out["gguf"]["f16"]["gguf"]


def test_a_broken_pre_tokenizer_in_the_gguf_fails_the_gate_and_the_run(smoke_pipeline, tmp_path, monkeypatch, capsys):
    """A GGUF whose `tokenizer.ggml.pre` names GPT-2's split instead of ours: llama.cpp reads other
    token ids, the gate says where, the flow fails and `mlxflow run export` exits non-zero."""
    from flows.cli import main
    from mlxcore.export import gguf

    real = gguf.export_gguf
    monkeypatch.setattr(gguf, "export_gguf", lambda *a, **kw: real(*a, **kw, _pre_override="gpt-2"))
    model = smoke_pipeline["result"]["checkpoint"]
    code = main(["run", "export", "--set", f"out_dir={tmp_path}", "--set", "name=broken", "--set", f"model={model}",
                 "--set", "formats=[f16]", "--set", "gate.examples=2"])
    err = capsys.readouterr().err
    assert code == 1 and "failed the parity gate" in err and "token ids differ" in err and "llama.cpp" in err, err
    assert not list((tmp_path / "broken").glob("parity-gate-*"))  # a failed gate is not cached as done
    # with gate.fail=false the same run reports it and completes
    state = _export(tmp_path, model, name="broken", formats=["f16"], gate={"examples": 2, "fail": False})
    assert state.is_completed() and state.result()["gates"]["f16"]["passed"] is False


def test_mlxcore_export_cli_without_prefect(smoke_pipeline, tmp_path):
    """`mlxcore export` (the library command, no Prefect): a q8_0 GGUF + Modelfile and an 8-bit MLX
    dir, gated; a dir that is not a model exits 2."""
    model = smoke_pipeline["result"]["checkpoint"]
    out = tmp_path / "exports"
    proc = subprocess.run([sys.executable, "-m", "mlxcore", "export", "--model", model, "--out", str(out),
                           "--format", "q8_0", "--format", "mlx-8bit", "--examples", "3"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    name = Path(model).parent.name
    assert (out / f"{name}-q8_0" / f"{name}-q8_0.gguf").is_file() and (out / f"{name}-q8_0" / "Modelfile").is_file()
    assert json.loads((out / "parity-q8_0.json").read_text())["passed"]
    assert (out / f"{name}-mlx-8bit" / "config.json").is_file()
    bad = subprocess.run([sys.executable, "-m", "mlxcore", "export", "--model", str(tmp_path), "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "not a model dir" in bad.stderr


def test_the_export_flow_pushes_gguf_and_mlx_to_the_hub_with_the_token_from_the_env(smoke_pipeline, tmp_path,
                                                                                     monkeypatch):
    """`export.push` through the real huggingface_hub client against the loopback stand-in: the GGUF and
    Modelfile at the top of the repo, the MLX export under mlx-8bit/, every byte, the token from
    `api_key_env` (never in the flow's parameters)."""
    from tests.hubstandin import HubStandin

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("MY_HF_TOKEN", "hf_write_token_for_tests")
    with HubStandin(tokens={"hf_write_token_for_tests": "write"}) as hub:
        state = _export(tmp_path, smoke_pipeline["result"]["checkpoint"], formats=["q8_0", "f16", "mlx-8bit"], gate=None,
                        push={"repo_id": "me/smoke", "endpoint": hub.endpoint, "api_key_env": "MY_HF_TOKEN"})
        assert state.is_completed(), state.message
        out = state.result()
        remote = hub.files("me/smoke")
    gguf = Path(out["gguf"]["q8_0"]["gguf"])
    assert remote[gguf.name] == gguf.read_bytes() and remote["Modelfile"] == (gguf.parent / "Modelfile").read_bytes()
    mlx = Path(out["mlx"][8]["model"])
    assert remote["mlx-8bit/model.safetensors"] == (mlx / "model.safetensors").read_bytes()
    assert {c["authorization"] for c in hub.api_calls} == {"Bearer hf_write_token_for_tests"}
    assert len(out["pushed"]["commits"]) == 3 and not any(p.endswith("manifest.json") for p in remote)  # ours stay home
    # a second GGUF format: its file beside the first's; the one Modelfile and card stay the first format's
    f16 = Path(out["gguf"]["f16"]["gguf"])
    assert remote[f16.name] == f16.read_bytes() and b"q8_0" in remote["Modelfile"] and b"f16" not in remote["Modelfile"]
    # the model card travels with the weights: the GGUF's at the top, the MLX export's beside it
    assert b"library_name: gguf" in remote["README.md"] and b"license: mit" in remote["README.md"]
    assert b"library_name: mlx" in remote["mlx-8bit/README.md"]
