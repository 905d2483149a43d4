"""mlxcore.rl.sampling.generate_batch on a micro model: greedy decoding gives mlx-lm's tokens
(prompts of different lengths, repeated prompts sharing one prefill, rows stopping early), the
returned log-probs are the scoring pass's, draws are reproducible under mx.random.seed, and
caches it cannot batch go through mlx-lm's loop."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import batch_generate, stream_generate

from mlxcore.rl import sampling
from mlxcore.rl.loop import sequence_logprobs

from tests.conftest import hf_model_dir


@pytest.fixture(scope="module")
def policy(tmp_path_factory, small_data):
    from mlxcore.models.generate import load_chat

    return load_chat(hf_model_dir(tmp_path_factory.mktemp("policy") / "m", small_data["tok"], model_type="qwen2"))


def _prompts(tok):
    texts = ["Compute: 1 + 1", "What is the capital of a very small imaginary country far away?", "Hi"]
    ids = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True) for t in texts]
    assert len({len(i) for i in ids}) == 3  # left padding is exercised
    return [ids[0], ids[1], ids[0], ids[2], ids[1]]  # repeats share a prefill


@pytest.fixture
def stop_restored(policy):
    _, tok = policy
    saved = set(tok.eos_token_ids)
    yield tok
    tok.eos_token_ids = saved


def test_greedy_matches_mlx_lm_with_left_padding_repeats_and_early_stops(policy, stop_restored):
    model, tok = policy
    prompts = _prompts(tok)
    free = sampling.generate_batch(model, tok, prompts, max_tokens=12, temperature=0.0)
    assert free.finish_reasons == ["length"] * 5 and all(len(t) == 12 for t in free.token_ids)
    one = list(stream_generate(model, tok, prompts[1], max_tokens=12))  # an independent B=1 decode
    assert [r.token for r in one] == free.token_ids[1]
    # make a token of row 3's reply (not in its first few) a stop token: some rows end early
    stop = next(t for t in free.token_ids[3][4:] if t not in free.token_ids[3][:4])
    tok.eos_token_ids = {stop}
    ours = sampling.generate_batch(model, tok, prompts, max_tokens=12, temperature=0.0)
    ref = batch_generate(model, tok, prompts, max_tokens=12, return_token_ids=True)
    assert ours.token_ids == ref.token_ids and ours.texts == ref.texts
    assert ours.finish_reasons[3] == "stop" and stop not in ours.token_ids[3] and len(ours.token_ids[3]) < 12
    for ids, reason in zip(ours.token_ids, ours.finish_reasons):
        assert reason == ("stop" if len(ids) < 12 else "length")


def test_sampled_logprobs_are_the_scoring_pass_and_draws_are_seeded(policy):
    model, tok = policy
    prompts = _prompts(tok)
    mx.random.seed(7)
    a = sampling.generate_batch(model, tok, prompts, max_tokens=10, temperature=1.0, top_p=0.9)
    mx.random.seed(7)
    b = sampling.generate_batch(model, tok, prompts, max_tokens=10, temperature=1.0, top_p=0.9)
    assert a.token_ids == b.token_ids and a.texts == b.texts
    assert a.token_ids[0] != a.token_ids[2]  # the same prompt twice: independent draws
    assert all(len(lp) == len(t) for lp, t in zip(a.logprobs, a.token_ids))
    again = sequence_logprobs(model, prompts, a.token_ids)
    for x, y in zip(again, a.logprobs):
        np.testing.assert_allclose(x, y, atol=1e-4)


def test_unbatchable_cache_goes_through_mlx_lm(policy, monkeypatch):
    model, tok = policy
    monkeypatch.setattr(sampling, "_plain_kv_layers", lambda model: None)
    prompts = _prompts(tok)
    res = sampling.generate_batch(model, tok, prompts, max_tokens=5, temperature=0.0)
    ref = batch_generate(model, tok, prompts, max_tokens=5, return_token_ids=True)
    assert res.token_ids == ref.token_ids and len(res.logprobs) == 5 and len(res.finish_reasons) == 5
    with pytest.raises(ValueError, match="empty prompt"):
        sampling.generate_batch(model, tok, [[]], max_tokens=5)


def test_generation_limits_blas_threads_only_while_it_runs(policy, monkeypatch):
    from mlxcore.perf import _blas

    api = _blas._thread_api()
    if api is None:
        pytest.skip(f"no MKL/OpenBLAS thread control here ({_blas.ensure_fast_blas().detail})")
    get, _ = api
    before, seen = get(), []
    model, tok = policy
    real = sampling._generate
    monkeypatch.setattr(sampling, "_generate", lambda *a: seen.append(get()) or real(*a))
    sampling.generate_batch(model, tok, _prompts(tok)[:2], max_tokens=2)
    assert seen == [sampling.DECODE_BLAS_THREADS] and get() == before
