"""The finetune flow: a local Hugging Face model dir, LoRA, two data-parallel ranks, under a real Prefect server."""

import os
from pathlib import Path

import pytest

from mlxcore.config import FinetuneConfig, load_config
from mlxcore.io import read_manifest

from tests.conftest import REPO, hf_model_dir

pytestmark = pytest.mark.usefixtures("prefect_server")


def test_finetune_flow_trains_adapters_on_a_local_qwen_dir_with_two_ranks(small_data, tmp_path):
    from flows.finetune import finetune

    base = hf_model_dir(tmp_path / "qwen3-tiny", small_data["tok"], "qwen3")
    config = load_config(REPO / "configs/finetune-lora.yaml", [
        f"out_dir={tmp_path / 'runs'}", f"base_model={base}", "data.synthetic.pretrain_docs=200",
        "data.synthetic.sft_examples=600", "data.synthetic.val_examples=64", "sft.steps=20", "sft.batch_size=4",
        "sft.world_size=2", "sft.lr=3e-3", "sft.eval_every=10", "sft.save_every=10", "sft.eval_batches=2",
        "sample.num_prompts=2", "sample.max_tokens=8",
        "export.formats=[f16,q8_0]", "export.gate.examples=8",
        # 1 MB of real text for llama.cpp and the tokenizer to agree on, when the test data is here
        *([f"export.gate.text=[{Path(os.environ['MLXFLOW_TEST_DATA']) / 'tinyshakespeare'}]"]
          if os.environ.get("MLXFLOW_TEST_DATA") else [])], cls=FinetuneConfig)
    state = finetune(config, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    adapter = result["checkpoint"]
    assert read_manifest(adapter)["kind"] == "adapter"
    assert result["train"]["sft"]["trainable_params"] < 0.2 * result["train"]["sft"]["params"]
    assert result["eval"]["sft"]["loss"] < result["eval"]["base"]["loss"] - 0.5
    assert len(result["samples"]["samples"]) == 2
    # shipped: the adapters fused into qwen3-layout GGUFs that llama.cpp reads and answers with like the checkpoint
    gates = result["export"]["gates"]
    assert gates["f16"]["tokens"]["differing_texts"] == 0 and gates["f16"]["identical"] >= 0.95, gates["f16"]
    for q, tol in (("f16", 1.0), ("q8_0", 2.0)):
        assert gates[q]["passed"] and all(s["drop"] <= tol for s in gates[q]["suites"].values()), gates[q]
