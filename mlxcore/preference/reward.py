"""Reward models: a decoder with a scalar `score` head, in Hugging Face's sequence-classification layout.

A reward model is the base model's decoder (`model.*`: embeddings, layers, final norm) plus one
linear layer `score` [1, hidden] read at the last real token of `prompt + response`. Saved as
`config.json` (architectures `LlamaForSequenceClassification` or the base family's, num_labels
1, pad_token_id) and `model.safetensors` with exactly those names, so

    transformers.AutoModelForSequenceClassification.from_pretrained(dir)

loads it and scores the same text the same (tested). Trained by `RewardLoss` on pairs
(Bradley-Terry) or on scored rows (regression) through the one training loop.

    from mlxcore.preference.reward import score
    score("runs/rm/model", ["What is 2+3?"], ["5"])     # -> [1.93]
"""

from __future__ import annotations

import json
from pathlib import Path

import mlxcore  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxcore.models import checkpoint, moe
from mlxcore.models.model import from_config

HEAD = "score"


class RewardModel(nn.Module):
    def __init__(self, decoder: nn.Module, hidden_size: int, model_type: str):
        super().__init__()
        self.model = decoder
        self.score = nn.Linear(hidden_size, 1, bias=False)
        self.model_type = model_type

    @property
    def layers(self):
        return self.model.layers

    def __call__(self, inputs: mx.array) -> mx.array:
        """Scores at every position: [B, T]."""
        return self.score(self.model(inputs))[..., 0]

    def sequence_scores(self, inputs: mx.array, last: mx.array) -> mx.array:
        """Each row's score at its last real token: [B]."""
        h = self.model(inputs)
        picked = mx.take_along_axis(h, last.astype(mx.int32)[:, None, None], axis=1)[:, 0]
        return self.score(picked)[:, 0].astype(mx.float32)


def reward_config(config: dict, pad_id: int | None) -> dict:
    """The `config.json` of a reward model on a base model's config."""
    arch = (config.get("architectures") or ["LlamaForCausalLM"])[0].replace("ForCausalLM", "ForSequenceClassification")
    out = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    return out | {"architectures": [arch], "num_labels": 1, "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0},
                  "pad_token_id": pad_id if pad_id is not None else config.get("pad_token_id")}


def from_base(base_dir: str | Path, pad_id: int | None, seed: int = 0) -> tuple[RewardModel, dict]:
    """A reward model on a causal LM's decoder, with a fresh head (normal, std 0.02 as HF does)."""
    lm, config = checkpoint.load(base_dir)
    if "quantization" in config:
        raise ValueError(f"{base_dir}: a quantized base; a reward model trains full weights (dequantize it first)")
    model = RewardModel(lm.model, config["hidden_size"], config.get("model_type", "llama"))
    mx.random.seed(seed)
    model.score.weight = (0.02 * mx.random.normal(model.score.weight.shape)).astype(model.score.weight.dtype)
    mx.eval(model.parameters())
    return model, reward_config(config, pad_id)


def is_reward_dir(path: str | Path) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    archs = json.loads(cfg.read_text()).get("architectures") or []
    return any(a.endswith("ForSequenceClassification") for a in archs)


def load(path: str | Path) -> tuple[RewardModel, dict]:
    path = Path(path)
    if not is_reward_dir(path):
        raise ValueError(f"{path}: not a reward model dir (config.json has no *ForSequenceClassification architecture)")
    config = json.loads((path / "config.json").read_text())
    if config.get("num_labels", 1) != 1:
        raise ValueError(f"{path}: num_labels {config['num_labels']}; a reward model has one scalar output")
    lm_config = config | {"architectures": [config["architectures"][0].replace("ForSequenceClassification", "ForCausalLM")]}
    lm = from_config(lm_config)
    model = RewardModel(lm.model, config["hidden_size"], config.get("model_type", "llama"))
    model.load_weights(list(moe.from_hf_layout(mx.load(str(path / "model.safetensors"))).items()), strict=True)
    mx.eval(model.parameters())
    model.eval()
    return model, config


def score(model_or_dir, prompts: list, responses: list[str], tokenizer=None, batch_size: int = 16) -> list[float]:
    """Rewards of `responses` to `prompts` (strings or message lists), rendered through the chat
    template as in training. `model_or_dir`: a reward model dir, or (RewardModel, tokenizer)."""
    from mlxcore.data import tokenizer as tokenizers
    from mlxcore.preference.data import Renderer

    if isinstance(model_or_dir, (str, Path)):
        model, config = load(model_or_dir)
        tokenizer = tokenizer or tokenizers.load(model_or_dir)
    else:
        model, config = model_or_dir, {}
    if tokenizer is None:
        raise ValueError("score: pass the tokenizer with a model object")
    if len(prompts) != len(responses):
        raise ValueError(f"score: {len(prompts)} prompts but {len(responses)} responses")
    render = Renderer(tokenizer)
    pad = config.get("pad_token_id") if config.get("pad_token_id") is not None else (tokenizer.pad_token_id or 0)
    seqs = []
    for p, r in zip(prompts, responses):
        msgs = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
        prompt_ids, (response_ids,), _ = render.encode(tokenizer.backend_tokenizer, msgs, [r])
        seqs.append(prompt_ids + response_ids)
    out = []
    for s in range(0, len(seqs), batch_size):
        part = seqs[s: s + batch_size]
        width = max(map(len, part))
        x = np.full((len(part), width), pad, dtype=np.int32)
        for i, q in enumerate(part):
            x[i, : len(q)] = q
        scores = model.sequence_scores(mx.array(x), mx.array([len(q) - 1 for q in part]))
        out += np.array(scores).tolist()
    return out
