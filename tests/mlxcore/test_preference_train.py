"""Preference training on the one loop: the objectives' arithmetic, a step that moves the margin,
exact resume through the training child, adapters, KTO / ORPO / SimPO, reward models that
Hugging Face loads and scores the same, and held-out evaluation."""

import json
import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlxcore.config import LoRAConfig, PreferenceObjective, QuantizeConfig, SyntheticPairsConfig
from mlxcore.models import checkpoint
from mlxcore.preference import data as pref_data, reference, reward, synthetic as pref_synthetic
from mlxcore.preference.batches import PreferenceBatches
from mlxcore.preference.losses import PreferenceLoss, RewardLoss, sequence_logprobs
from mlxcore.preference.train import PreferenceJob, RewardJob, evaluate, run, run_reward
from mlxcore.train import loop, optimizers
from mlxcore.train.callbacks import TrainingCallback
from mlxcore.train.launch import JOBS, TrainingFailed, run_in_subprocess
from mlxcore.train.loop import TrainJob
from mlxcore.train.step import make_step

from tests.conftest import kill_after_first_checkpoint, micro_model, quick_train

SEQ = 64
# CPU kernels are deterministic (bit-identical resume); MLX's CUDA kernels are not bitwise so.
ON_CPU = mx.default_device() == mx.cpu


class Recorder(TrainingCallback):
    def __init__(self):
        self.events = []

    def on_event(self, event, info):
        self.events.append((event, info))


@pytest.fixture(scope="module")
def prefs(small_data, tmp_path_factory):
    """A micro model pretrained then SFT'd briefly; synthetic pairs / KTO / scored rows tokenized
    with its tokenizer; the SFT model's reference log-probs on the pairs and the KTO rows."""
    root = tmp_path_factory.mktemp("preference")
    tok = small_data["tok"]
    base = loop.run(TrainJob(data_dir=str(small_data["pretrain"]), tokenizer_dir=str(tok), out_dir=str(root / "base"),
                             model=micro_model(), train=quick_train(steps=24, eval_every=0, save_every=0)))
    sft = loop.run(TrainJob(data_dir=str(small_data["sft"]), tokenizer_dir=str(tok), out_dir=str(root / "sft"),
                            init_from=base["checkpoint"],
                            train=quick_train(steps=24, lr=2e-3, eval_every=0, save_every=0)))
    out = {"root": root, "tok": tok, "sft": Path(sft["checkpoint"])}
    for rows in ("pairs", "kto", "scored"):
        pref_synthetic.write_dataset(SyntheticPairsConfig(train_examples=200, val_examples=40, rows=rows),
                                     root / f"raw-{rows}")
        manifest = pref_data.pretokenize(root / f"raw-{rows}", tok, root / rows, max_tokens=SEQ + 1,
                                         progress_bar=False)
        assert manifest["rows"] == rows and manifest["stats"]["truncated"] == 0
        out[rows] = root / rows
    for rows in ("pairs", "kto"):
        reference.compute(out["sft"], out[rows], root / f"ref-{rows}", seq_len=SEQ, progress_bar=False)
        out[f"ref-{rows}"] = root / f"ref-{rows}"
    return out


def _train(**overrides):
    base = dict(steps=10, batch_size=4, seq_len=SEQ, lr=1e-3, warmup_steps=2, eval_every=0, eval_batches=2,
                save_every=0, log_every=2, weight_decay=0.0)
    return quick_train(**{**base, **overrides})


def _pref_job(prefs, out, objective="dpo", rows="pairs", reference_dir="default", **train):
    ref = prefs.get(f"ref-{rows}") if reference_dir == "default" else reference_dir
    return PreferenceJob(data_dir=str(prefs[rows]), tokenizer_dir=str(prefs["tok"]), out_dir=str(out),
                         init_from=str(prefs["sft"]), reference_dir=str(ref) if ref else None,
                         train=_train(**train), objective=PreferenceObjective(name=objective))


def _reward_job(prefs, out, rows="pairs", **train):
    return RewardJob(data_dir=str(prefs[rows]), tokenizer_dir=str(prefs["tok"]), out_dir=str(out),
                     init_from=str(prefs["sft"]), train=_train(**train))


def _batch(prefs, rows="pairs", n=8, ref=True):
    data = pref_data.Examples(prefs[rows], "train")
    refs = reference.load(prefs[f"ref-{rows}"], "train") if ref else None
    b = PreferenceBatches(prefs[rows], "train", n, SEQ, shuffle=False, pad_id=data.manifest["pad_id"], reference=refs)
    return b.next()[0]


def _weights(path, name="model.safetensors"):
    return {k: np.array(v) for k, v in mx.load(str(Path(path) / name)).items()}


# ------------------------------------------------------------------ the objectives' arithmetic


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _numpy_loss(objective, beta, eps, gamma, w_d, w_u, sft, logp, n, ref, label):
    """Per-example losses from the formulas of losses.py's docstring."""
    n = np.maximum(n, 1.0)
    if objective == "kto":
        r = logp - ref
        z = max(r.mean(), 0.0)
        des = label > 0.5
        out = np.where(des, w_d * (1 - _sigmoid(beta * (r - z))), w_u * (1 - _sigmoid(beta * (z - r))))
        return out - np.where(des, sft * logp / n, 0.0)
    pc, pr, rc, rr, nc, nr = logp[0::2], logp[1::2], ref[0::2], ref[1::2], n[0::2], n[1::2]
    h = (pc - rc) - (pr - rr)
    if objective == "dpo":
        out = -(1 - eps) * _log_sigmoid(beta * h) - eps * _log_sigmoid(-beta * h)
    elif objective == "ipo":
        out = ((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2
    elif objective == "hinge":
        out = np.maximum(0.0, 1 - beta * h)
    elif objective == "simpo":
        zz = beta * (pc / nc - pr / nr) - gamma
        out = -(1 - eps) * _log_sigmoid(zz) - eps * _log_sigmoid(-zz)
    else:  # orpo
        log_odds = lambda a: a - np.log(1 - np.exp(a))  # noqa: E731
        return -pc / nc - beta * _log_sigmoid(log_odds(pc / nc) - log_odds(pr / nr))
    return out - sft * pc / nc


def _policy(prefs):
    model, _ = checkpoint.load(prefs["sft"])
    return model


def test_at_the_reference_every_objective_has_its_textbook_value(prefs):
    model = _policy(prefs)
    batch = _batch(prefs)
    logp, _ = sequence_logprobs(model, *(mx.array(batch[k]) for k in ("inputs", "targets", "mask")))
    batch["ref"] = np.array(logp)  # the policy is its own reference
    beta, pairs = 0.1, len(batch["target"])
    want = {"dpo": math.log(2), "hinge": 1.0, "ipo": (1 / (2 * beta)) ** 2}
    for objective, per_pair in want.items():
        loss = PreferenceLoss(objective, beta=beta)
        total, count, aux = loss(model, *map(mx.array, loss.prepare(batch)))
        assert count.item() == pairs
        assert total.item() / pairs == pytest.approx(per_pair, rel=1e-5), objective
        assert aux["accuracy"].item() / pairs == 0.5  # every pair a tie
        assert aux["kl"].item() == 0.0 and aux["margin"].item() == 0.0
        assert aux["reward_chosen"].item() == 0.0 and aux["reward_rejected"].item() == 0.0
    kto = _batch(prefs, "kto")
    logp, _ = sequence_logprobs(model, *(mx.array(kto[k]) for k in ("inputs", "targets", "mask")))
    kto["ref"] = np.array(logp)
    loss = PreferenceLoss("kto", beta=beta)
    total, count, aux = loss(model, *map(mx.array, loss.prepare(kto)))
    assert total.item() / count.item() == pytest.approx(0.5, rel=1e-6)  # 1 - s(0) for every row
    assert aux["accuracy"].item() / count.item() == 0.5 and aux["kl"].item() == 0.0


CASES = [
    dict(objective="dpo"),
    dict(objective="dpo", label_smoothing=0.2),
    dict(objective="dpo", sft_weight=0.5),
    dict(objective="ipo", beta=0.5),
    dict(objective="hinge", beta=0.5),
    dict(objective="simpo", beta=2.0, gamma=0.3),
    dict(objective="simpo", beta=2.0, label_smoothing=0.1),
    dict(objective="orpo", beta=0.2),
    dict(objective="kto", beta=0.3, desirable_weight=1.5, undesirable_weight=0.7),
    dict(objective="kto", beta=0.3, sft_weight=0.4),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_each_objective_matches_a_numpy_recomputation(prefs, case):
    model = _policy(prefs)
    rows = "kto" if case["objective"] == "kto" else "pairs"
    batch = _batch(prefs, rows)
    # a reference some way off the policy, so every branch (hinge's both sides, KTO's z > 0 or 0) is real
    batch["ref"] = batch["ref"] + np.random.default_rng(0).normal(0.0, 3.0, batch["ref"].shape).astype(np.float32)
    kw = dict(beta=0.1, label_smoothing=0.0, gamma=0.5, desirable_weight=1.0, undesirable_weight=1.0,
              sft_weight=0.0) | {k: v for k, v in case.items() if k != "objective"}
    loss = PreferenceLoss(case["objective"], **kw)
    total, count, aux = loss(model, *map(mx.array, loss.prepare(batch)))
    logp, n = sequence_logprobs(model, *(mx.array(batch[k]) for k in ("inputs", "targets", "mask")))
    logp, n = np.array(logp, dtype=np.float64), np.array(n, dtype=np.float64)
    ref = batch["ref"].astype(np.float64) if loss.uses_reference else np.zeros_like(logp)
    want = _numpy_loss(case["objective"], kw["beta"], kw["label_smoothing"], kw["gamma"], kw["desirable_weight"],
                       kw["undesirable_weight"], kw["sft_weight"], logp, n, ref, batch["target"])
    assert count.item() == len(want) == len(batch["target"])
    assert total.item() == pytest.approx(want.sum(), rel=1e-4, abs=1e-4)
    if case["objective"] in ("dpo", "ipo", "hinge"):  # the reported implicit rewards and drift
        gc, gr = kw["beta"] * (logp[0::2] - ref[0::2]), kw["beta"] * (logp[1::2] - ref[1::2])
        d = (ref - logp) / np.maximum(n, 1)
        k3 = np.exp(d) - d - 1
        assert aux["reward_chosen"].item() == pytest.approx(gc.sum(), rel=1e-4, abs=1e-4)
        assert aux["margin"].item() == pytest.approx((gc - gr).sum(), rel=1e-4, abs=1e-4)
        assert aux["accuracy"].item() == ((gc > gr) + 0.5 * (gc == gr)).sum()
        assert aux["kl"].item() == pytest.approx(k3.reshape(-1, 2).mean(axis=1).sum(), rel=1e-4, abs=1e-4)
    if case["objective"] == "hinge":  # the random reference puts pairs on both sides of the hinge
        h = (logp[0::2] - ref[0::2]) - (logp[1::2] - ref[1::2])
        assert (kw["beta"] * h > 1).any() and (kw["beta"] * h < 1).any()


def test_a_reference_objective_without_reference_log_probs_or_an_unknown_objective_fails_clearly(prefs):
    batch = _batch(prefs, ref=False)
    for objective in ("dpo", "ipo", "hinge", "kto"):
        with pytest.raises(ValueError, match="needs the reference model's log-probs"):
            PreferenceLoss(objective).prepare(batch)
    for objective in ("simpo", "orpo"):  # no reference: zeros stand in, unused
        assert PreferenceLoss(objective).prepare(batch)[3].tolist() == [0.0] * 16
    with pytest.raises(ValueError, match="objective must be one of"):
        PreferenceLoss("dpop")
    with pytest.raises(ValueError, match="pairs or scored rows"):
        RewardLoss("kto")


def test_the_dense_reward_term_covers_the_positions_after_the_replies_differ():
    """Pair 0 differs from position 3 on (last tokens 5, 4): the dense term averages the per-position
    Bradley-Terry loss over 3..4; pair 1 is identical but its last token, so only position 5 counts."""

    class Scores:  # a reward model whose score at a position is a tenth of its token id
        def __call__(self, x):
            return x.astype(mx.float32) / 10

        def sequence_scores(self, x, last):
            return mx.take_along_axis(self(x), last[:, None], axis=1)[:, 0]

    x = np.array([[1, 2, 3, 9, 8, 7, 0], [1, 2, 3, 4, 5, 0, 0], [5, 5, 5, 5, 5, 6, 0], [5, 5, 5, 5, 5, 2, 0]],
                 dtype=np.int32)
    last = np.array([5, 4, 5, 5], dtype=np.int32)
    args = (Scores(), mx.array(x), mx.array(last), mx.array(np.zeros(2, np.float32)))
    plain, n, _ = RewardLoss("pairs")(*args)
    dense, n2, aux = RewardLoss("pairs", dense=2.0)(*args)
    s = x / 10
    bt = lambda d: np.log1p(np.exp(-d))  # noqa: E731
    final = bt(s[0, 5] - s[1, 4]) + bt(s[2, 5] - s[3, 5])
    extra = 2.0 * (np.mean([bt(s[0, t] - s[1, t]) for t in (3, 4)]) + bt(s[2, 5] - s[3, 5]))
    assert n.item() == n2.item() == 2 and aux["accuracy"].item() == 2.0  # a sum over pairs
    assert plain.item() == pytest.approx(final, rel=1e-5)
    assert dense.item() == pytest.approx(final + extra, rel=1e-5)


# ------------------------------------------------------------------ a step moves the margin


def test_one_dpo_step_raises_the_margin_and_lr_zero_changes_nothing(prefs, tmp_path):
    model = _policy(prefs)
    batch = _batch(prefs)
    loss = PreferenceLoss("dpo", beta=0.1)
    arrays = [mx.array(a) for a in loss.prepare(batch)]
    before_loss, _, before = loss(model, *arrays)
    opt = optimizers.build(_train(lr=1e-4, warmup_steps=0, steps=1))
    opt.init(model.trainable_parameters())
    step, state = make_step(model, opt, loss=loss)
    step([batch])
    mx.eval(state)
    after_loss, _, after = loss(model, *arrays)
    assert after["margin"].item() > before["margin"].item() + 1e-3
    assert after_loss.item() < before_loss.item()

    result = run(_pref_job(prefs, tmp_path / "lr0", lr=0.0, steps=3, weight_decay=0.1))  # decay scales with lr too
    assert result["step"] == 3
    start, end = _weights(prefs["sft"]), _weights(tmp_path / "lr0/model")
    assert start.keys() == end.keys() and all(np.array_equal(start[k], end[k]) for k in start)


# ------------------------------------------------------------------ jobs, resume, adapters


RESUME = dict(steps=24, save_every=8, eval_every=12, keep_last=2)


@pytest.fixture(scope="module")
def dpo_straight(prefs, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo") / "straight"
    return run(_pref_job(prefs, out, **RESUME)), out


@pytest.fixture(scope="module")
def reward_straight(prefs, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm") / "straight"
    return run_reward(_reward_job(prefs, out, **RESUME)), out


def _assert_same_run(straight_dir, resumed_dir, resumed, straight):
    assert resumed["resumed_from"] and "step-" in resumed["resumed_from"]
    assert resumed["step"] == straight["step"] == RESUME["steps"]
    a, b = _weights(straight_dir / "model"), _weights(resumed_dir / "model")
    assert a.keys() == b.keys()
    if ON_CPU:
        for name in ("model.safetensors", "optimizer.safetensors"):
            assert (straight_dir / "model" / name).read_bytes() == (resumed_dir / "model" / name).read_bytes(), name
        assert resumed["val_loss"] == straight["val_loss"] and resumed["train_loss"] == straight["train_loss"]
    else:
        for k in a:
            np.testing.assert_allclose(b[k], a[k], atol=1e-3, err_msg=k)


def test_dpo_killed_in_the_child_then_rerun_ends_bit_identical(prefs, dpo_straight, tmp_path):
    straight, straight_dir = dpo_straight
    assert straight["val_loss"] < straight["initial_val_loss"]
    job = _pref_job(prefs, tmp_path / "killed", **RESUME)
    assert 0 < kill_after_first_checkpoint(job, tmp_path) < RESUME["steps"]
    rec = Recorder()
    resumed = run_in_subprocess(job, rec)  # launch JOBS["preference"] in a child, to the end
    assert resumed["checkpoint"] == str(tmp_path / "killed/model")
    assert rec.events[0][1]["start_step"] > 0
    trains = [i for e, i in rec.events if e == "train"]
    assert trains and all({"margin", "accuracy", "kl", "reward_chosen", "reward_rejected"} <= i.keys() for i in trains)
    assert json.loads((tmp_path / "killed/job.json").read_text())["kind"] == "preference"
    _assert_same_run(straight_dir, tmp_path / "killed", resumed, straight)


def test_reward_model_killed_in_the_child_then_rerun_ends_bit_identical(prefs, reward_straight, tmp_path):
    straight, straight_dir = reward_straight
    job = _reward_job(prefs, tmp_path / "killed", **RESUME)
    assert 0 < kill_after_first_checkpoint(job, tmp_path) < RESUME["steps"]
    resumed = run_in_subprocess(job)  # launch JOBS["reward-model"]
    assert resumed["checkpoint"] == str(tmp_path / "killed/model")
    _assert_same_run(straight_dir, tmp_path / "killed", resumed, straight)


@pytest.mark.parametrize("quantize", [None, QuantizeConfig(bits=4, group_size=32)], ids=["lora", "qlora4"])
def test_lora_and_qlora_dpo_write_adapter_dirs(prefs, tmp_path, quantize):
    job = _pref_job(prefs, tmp_path / "run", steps=6, lr=5e-3, fine_tune_type="lora", quantize=quantize,
                    lora=LoRAConfig(rank=4, alpha=8))
    result = run(job)
    assert result["step"] == 6 and 0 < result["trainable_params"] < result["params"] / 5
    final = tmp_path / "run/model"
    names = {p.name for p in final.iterdir()}
    assert {"adapters.safetensors", "adapter_config.json"} <= names and "model.safetensors" not in names
    acfg = json.loads((final / "adapter_config.json").read_text())
    assert acfg["fine_tune_type"] == "lora" and acfg["base_model"] == str(prefs["sft"].resolve())
    model, _ = checkpoint.load(final)  # the base as trained under the adapters: 4-bit for QLoRA
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules()) == (quantize is not None)
    if quantize is None:  # evaluate reads an adapter dir as base + adapters
        metrics = evaluate(final, prefs["pairs"], reference_dir=prefs["ref-pairs"], seq_len=SEQ)
        assert metrics["examples"] == 40 and math.isfinite(metrics["loss"]) and metrics["margin"] != 0.0


def test_kto_orpo_and_simpo_jobs_train(prefs, tmp_path):
    rec = Recorder()
    kto = run(_pref_job(prefs, tmp_path / "kto", objective="kto", rows="kto", steps=6), rec)
    assert kto["step"] == 6 and math.isfinite(kto["train_loss"]) and math.isfinite(kto["val_loss"])
    assert all("accuracy" in i and "kl" in i for e, i in rec.events if e == "train")
    for objective in ("orpo", "simpo"):  # no reference needed
        result = run(_pref_job(prefs, tmp_path / objective, objective=objective, reference_dir=None, steps=6))
        assert result["step"] == 6 and math.isfinite(result["val_loss"]) and math.isfinite(result["train_loss"])


def test_missing_reference_and_mismatched_rows_fail_clearly(prefs, tmp_path):
    with pytest.raises(ValueError, match="needs reference log-probs"):
        run(_pref_job(prefs, tmp_path / "a", reference_dir=None))
    with pytest.raises(ValueError, match="objective kto trains on unpaired rows"):
        run(_pref_job(prefs, tmp_path / "b", objective="kto", rows="pairs"))
    with pytest.raises(ValueError, match="objective dpo trains on pairs.*kto rows"):
        run(_pref_job(prefs, tmp_path / "c", objective="dpo", rows="kto"))
    with pytest.raises(ValueError, match="not KTO rows"):
        run_reward(_reward_job(prefs, tmp_path / "d", rows="kto"))
    with pytest.raises(ValueError, match="full weights"):
        run_reward(_reward_job(prefs, tmp_path / "e", fine_tune_type="lora"))
    with pytest.raises(ValueError, match="computed on other data"):  # the pairs' reference on KTO rows
        run(_pref_job(prefs, tmp_path / "f", objective="kto", rows="kto", reference_dir=prefs["ref-pairs"]))
    # through the child: the trainer's one-line message, not a traceback to dig through
    with pytest.raises(TrainingFailed, match="needs reference log-probs"):
        run_in_subprocess(_pref_job(prefs, tmp_path / "g", reference_dir=None))
    assert not any((tmp_path / d / "model").exists() for d in "abcdefg")


def test_launch_maps_the_preference_kinds():
    assert JOBS["preference"] == ("mlxcore.preference.train", "PreferenceJob", "run")
    assert JOBS["reward-model"] == ("mlxcore.preference.train", "RewardJob", "run_reward")
    assert PreferenceJob.model_fields["kind"].default == "preference"
    assert RewardJob.model_fields["kind"].default == "reward-model"


# ------------------------------------------------------------------ reward models


def test_reward_model_dir_is_hf_sequence_classification(reward_straight):
    _, out = reward_straight
    rm = out / "model"
    config = json.loads((rm / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["num_labels"] == 1
    assert "pad_token_id" in config and reward.is_reward_dir(rm)
    keys = set(mx.load(str(rm / "model.safetensors")))
    assert "score.weight" in keys and all(k.startswith("model.") for k in keys - {"score.weight"})
    assert not any(k.startswith("lm_head") for k in keys)
    assert mx.load(str(rm / "model.safetensors"))["score.weight"].shape == (1, config["hidden_size"])
    # it trains through the fused CPU kernels of its decoder's mlx-lm module, as its base did (a
    # fresh trainer process that skipped them rounded differently from one that had used them)
    from mlxcore.kernels.patch import use_fast_kernels

    assert use_fast_kernels(reward.load(rm)[0])


def test_reward_scores_equal_transformers_logits(prefs, reward_straight):
    try:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
    except Exception as e:  # pragma: no cover
        pytest.skip(f"transformers / torch unavailable: {e}")
    _, out = reward_straight
    rm = out / "model"
    prompts = ["Sort: 3 1 2", "Copy: abcde", "Compute: 12 + 30"]
    responses = ["1 2 3", "abcdx", "42"]
    ours = reward.score(rm, prompts, responses)
    hf_tok = AutoTokenizer.from_pretrained(str(rm))
    hf = AutoModelForSequenceClassification.from_pretrained(str(rm), torch_dtype=torch.float32).eval()
    from mlxcore.data import tokenizer as tokenizers

    tok = tokenizers.load(rm)
    render = pref_data.Renderer(tok)
    theirs = []
    for p, r in zip(prompts, responses):
        messages = [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
        text = hf_tok.apply_chat_template(messages, tokenize=False)
        ids = hf_tok(text, add_special_tokens=False)["input_ids"]
        prompt_ids, (response_ids,), _ = render.encode(tok.backend_tokenizer, messages[:1], [r])
        assert ids == prompt_ids + response_ids
        with torch.no_grad():
            theirs.append(hf(torch.tensor([ids])).logits[0, 0].item())
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)
    assert len(set(np.round(ours, 4))) > 1  # different texts, different scores
    # a loaded model and its tokenizer score the same; right padding in a batch changes nothing
    model, _ = reward.load(rm)
    one_by_one = reward.score(model, prompts, responses, tokenizer=tok, batch_size=1)
    np.testing.assert_allclose(one_by_one, ours, atol=1e-5)


def test_reward_model_evaluate_and_scored_rows(prefs, reward_straight, tmp_path):
    _, out = reward_straight
    metrics = evaluate(out / "model", prefs["pairs"], seq_len=SEQ)
    assert metrics["examples"] == 40 and 0.0 <= metrics["accuracy"] <= 1.0
    assert math.isfinite(metrics["margin"]) and math.isfinite(metrics["loss"])
    rec = Recorder()
    result = run_reward(_reward_job(prefs, tmp_path / "scored", rows="scored", steps=6), rec)
    assert result["step"] == 6 and result["val_loss"] < result["initial_val_loss"]
    trains = [i for e, i in rec.events if e == "train"]
    assert trains and all("abs_error" in i and "accuracy" not in i for i in trains)
    scored = evaluate(tmp_path / "scored/model", prefs["scored"], seq_len=SEQ)
    assert scored["examples"] == 80 and 0.0 <= scored["abs_error"] and math.isfinite(scored["loss"])


# ------------------------------------------------------------------ held-out evaluation


def test_the_reference_against_itself_is_a_coin_toss(prefs):
    metrics = evaluate(prefs["sft"], prefs["pairs"], reference_dir=prefs["ref-pairs"], seq_len=SEQ)
    assert metrics["examples"] == 40
    assert metrics["accuracy"] == 0.5 and metrics["margin"] == 0.0 and metrics["kl"] == 0.0
    assert metrics["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert 0.0 <= metrics["logp_accuracy"] <= 1.0
    without = evaluate(prefs["sft"], prefs["pairs"], seq_len=SEQ)  # no reference: no DPO metrics
    assert without["examples"] == 40 and "accuracy" not in without and "loss" not in without


def test_a_trained_dpo_policy_gains_on_held_out_pairs(prefs, dpo_straight):
    _, out = dpo_straight
    metrics = evaluate(out / "model", prefs["pairs"], reference_dir=prefs["ref-pairs"], seq_len=SEQ)
    # 24 small steps: the held-out margin is positive and the DPO loss below its starting ln 2
    assert metrics["margin"] > 0.0 and metrics["loss"] < math.log(2) - 0.01
    assert metrics["accuracy"] >= 0.5 and metrics["kl"] > 0.0 and metrics["examples"] == 40
