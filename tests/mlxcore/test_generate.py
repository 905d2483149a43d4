"""Chat-templated sampling, in-process and through `mlxflow generate`."""

import pytest
import subprocess
import sys

from mlxcore.models import checkpoint
from mlxcore.data import tokenizer as tokenizers
from mlxcore.models.generate import load_chat, reply
from mlxcore.models.model import from_config, hf_config

from tests.conftest import micro_model


def _ckpt(tmp_path, small_data):
    tok = tokenizers.load(small_data["tok"])
    config = hf_config(micro_model(), len(tok), tokenizers.special_ids(tok))
    return checkpoint.save(tmp_path / "ckpt", from_config(config), config, {"step": 0}, tokenizer_dir=small_data["tok"])


def test_greedy_reply_is_deterministic_and_sampling_follows_the_seed(tmp_path, small_data):
    import mlx.core as mx

    model, tok = load_chat(_ckpt(tmp_path, small_data))
    assert reply(model, tok, "Sort: 3 1 2", max_tokens=8) == reply(model, tok, "Sort: 3 1 2", max_tokens=8)
    mx.random.seed(1)
    a = reply(model, tok, "Copy: xy", max_tokens=12, temperature=1.0, top_p=0.9)
    mx.random.seed(1)
    assert reply(model, tok, "Copy: xy", max_tokens=12, temperature=1.0, top_p=0.9) == a


@pytest.mark.slow
def test_generate_cli(tmp_path, small_data):
    path = _ckpt(tmp_path, small_data)
    out = subprocess.run([sys.executable, "-m", "flows.cli", "generate", "--checkpoint", str(path), "--prompt", "Copy: abc",
                          "--max-tokens", "4"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    bad = subprocess.run([sys.executable, "-m", "flows.cli", "generate", "--checkpoint", str(tmp_path), "--prompt", "x"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "not a checkpoint" in bad.stderr
