"""mlxcore.kernels.patch against the installed mlx-lm: the real `use_fast_kernels` routes every
layer of llama, qwen2, qwen3 and qwen3_moe through the fused CPU kernels, with mlx-lm's results.

The patch rebinds mlx-lm internals (`scaled_dot_product_attention`, `swiglu` in each
`mlx_lm.models.<arch>`); an upstream rename would only make training slower, so these tests
check the names, the signatures and, during a forward pass, the calls. All three families use
`swiglu` in their MLP (mlx_lm/models/{llama,qwen2,qwen3}.py: `swiglu(gate_proj(x), up_proj(x))`).
The routing tests need the fused kernels (Linux, CPU default device); elsewhere they skip.
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from collections import Counter

import mlxcore  # noqa: F401
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlxcore import kernels
from mlxcore.kernels import _build, patch
from mlxcore.config import ModelConfig
from mlxcore.models.model import from_config, hf_config
from tests.conftest import micro_model, tiny_hf_config

ARCHS = ("llama", "qwen2", "qwen3", "qwen3_moe")
LAYERS = 3  # not 2 = the batch size, so a per-layer count cannot match by accident
VOCAB = 300
# both paths compute in float32; they sum in different orders (see test_kernels.py)
OUT_TOL = dict(rtol=1e-5, atol=1e-5)


def _config(arch: str) -> dict:
    if arch == "llama":
        config = hf_config(micro_model(), VOCAB)  # what mlxcore trains
    elif arch == "qwen3_moe":  # what mlxcore trains as a mixture of experts (every layer sparse)
        moe = micro_model().model_dump() | dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
        config = hf_config(ModelConfig(**moe), VOCAB)
    else:
        config = tiny_hf_config(arch, VOCAB)  # what finetune / distill load from the Hub
    return {**config, "num_hidden_layers": LAYERS, "torch_dtype": "float32"}


def _module(arch: str):
    return importlib.import_module(f"mlx_lm.models.{arch}")


def _tokens(seed=0, shape=(2, 24)) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(0, VOCAB, shape))


@pytest.fixture(autouse=True)
def unpatched():
    """Every test starts and ends with mlx-lm's own functions bound."""
    patch.restore_all()
    yield
    patch.restore_all()


@pytest.fixture
def fast():
    if _build.mode() == "off":
        pytest.skip("MLXFLOW_KERNELS=off: the patch routes to plain MLX")
    if not kernels.available():
        pytest.skip(f"fused CPU kernels unavailable here (Linux CPU only): {_build.error() or kernels.status()}")


class _Spy:
    """Counts calls to the functions it wraps, by name."""

    def __init__(self):
        self.calls = Counter()

    def wrap(self, name, fn):
        def spy(*args, **kwargs):
            self.calls[name] += 1
            return fn(*args, **kwargs)

        return spy


@pytest.fixture
def spy(monkeypatch):
    """Counts calls into mlxcore.kernels' attention / swiglu (the names the wrappers look up)
    and into the C++ extension itself (`ext.attention`, `ext.swiglu`: the fused path ran)."""
    counter = _Spy()
    for name in ("attention", "swiglu"):
        monkeypatch.setattr(kernels, name, counter.wrap(name, getattr(kernels, name)))
    real_ext = kernels._ext

    class CountingExt:
        def __init__(self, ext):
            self._ext = ext

        def __getattr__(self, name):
            return counter.wrap(f"ext.{name}", getattr(self._ext, name))

    def ext():
        e = real_ext()
        return None if e is None else CountingExt(e)

    monkeypatch.setattr(kernels, "_ext", ext)
    return counter.calls


# ------------------------------------------------------------- names and signatures (any OS)
@pytest.mark.parametrize("arch", ARCHS)
def test_arch_modules_bind_the_patched_names(arch):
    """The names use_fast_kernels rebinds exist at module level and are mlx-lm's shared ones."""
    from mlx_lm.models import activations, base

    module = _module(arch)
    assert module.scaled_dot_product_attention is base.scaled_dot_product_attention
    assert module.swiglu is activations.swiglu
    assert patch.EXPECTED[module.__name__] == (patch.ATTENTION, patch.SWIGLU)
    # the model's layers live in that module (the one use_fast_kernels patches)
    assert type(from_config(_config(arch))).__module__ == module.__name__


def test_experts_swiglu_is_patched_beside_qwen3_moe(fast, spy):
    """A qwen3_moe's experts (SwitchGLU) call `swiglu` in switch_layers: patched with the model
    module, restored with it; a dense model leaves switch_layers alone."""
    from mlx_lm.models import activations, switch_layers

    assert switch_layers.swiglu is activations.swiglu
    patch.use_fast_kernels(from_config(_config("qwen3")))
    assert switch_layers.swiglu is activations.swiglu
    patch.use_fast_kernels(from_config(_config("qwen3_moe")))
    assert switch_layers.swiglu.__module__ == patch.__name__
    patch.restore_all()
    assert switch_layers.swiglu is activations.swiglu


def _shape(sig: inspect.Signature):
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


def test_wrappers_take_exactly_mlx_lm_parameters():
    from mlx_lm.models import activations, base

    sdpa = inspect.signature(base.scaled_dot_product_attention)
    assert _shape(inspect.signature(patch._wrap_attention(base.scaled_dot_product_attention))) == _shape(sdpa)
    assert tuple(sdpa.parameters) == patch.PARAMETERS[patch.ATTENTION]
    sw = inspect.signature(activations.swiglu)
    assert _shape(inspect.signature(patch._wrap_swiglu(activations.swiglu))) == _shape(sw)
    assert tuple(sw.parameters) == patch.PARAMETERS[patch.SWIGLU]


def test_pyproject_caps_mlx_lm_below_the_next_minor():
    """The cap moves with a deliberate upgrade: this test and the checks above run on it."""
    import re
    import tomllib
    from importlib.metadata import version
    from pathlib import Path

    deps = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in deps if re.match(r"mlx-lm\b", d))
    cap = re.search(r"<\s*([0-9]+)\.([0-9]+)", spec)
    assert cap, f"{spec!r}: no upper bound"
    major, minor = (int(x) for x in version("mlx-lm").split(".")[:2])
    assert (int(cap[1]), int(cap[2])) == (major, minor + 1), (spec, version("mlx-lm"))


# ------------------------------------------------------------- loud failure on a rename
def test_missing_name_warns_and_patches_the_rest(monkeypatch):
    module = _module("qwen3")
    monkeypatch.delattr(module, "swiglu")  # as if upstream renamed it
    model = from_config(_config("qwen3"))
    with pytest.warns(patch.KernelPatchWarning, match=r"mlx_lm\.models\.qwen3 no longer binds 'swiglu'"):
        assert patch.use_fast_kernels(model) is True
    assert module.scaled_dot_product_attention.__module__ == patch.__name__  # still patched
    assert not hasattr(module, "swiglu")


def test_changed_signature_warns_and_is_left_alone(monkeypatch):
    module = _module("llama")

    def renamed(queries, keys, values, cache, scale, mask, sinks=None, window=None):
        raise AssertionError("not called here")

    monkeypatch.setattr(module, "scaled_dot_product_attention", renamed)
    with pytest.warns(patch.KernelPatchWarning, match="scaled_dot_product_attention takes"):
        assert patch.use_fast_kernels(from_config(_config("llama"))) is True  # swiglu still patched
    assert module.scaled_dot_product_attention is renamed
    assert module.swiglu.__module__ == patch.__name__


def test_all_names_missing_returns_false(monkeypatch):
    module = _module("qwen2")
    monkeypatch.delattr(module, "swiglu")
    monkeypatch.delattr(module, "scaled_dot_product_attention")
    with pytest.warns(patch.KernelPatchWarning) as record:
        assert patch.use_fast_kernels(from_config(_config("qwen2"))) is False
    assert {str(w.message).split("'")[1] for w in record} == {"swiglu", "scaled_dot_product_attention"}


def test_expected_modules_patch_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error", patch.KernelPatchWarning)
        for arch in ARCHS:
            assert patch.use_fast_kernels(from_config(_config(arch))) is True


# ---------------------------------------------------- routing and results (Linux CPU only)
@pytest.mark.parametrize("arch", ARCHS)
def test_every_layer_runs_the_fused_kernels_with_mlx_lm_results(fast, spy, arch):
    x = _tokens()
    model = from_config(_config(arch), seed=1)
    reference = model(x)
    mx.eval(reference)
    assert sum(spy.values()) == 0  # unpatched: mlx-lm's own functions only
    import mlx.nn as nn

    norms = sum(isinstance(m, nn.RMSNorm) for _, m in model.named_modules())  # each runs once
    ropes = 2 * sum(isinstance(m, nn.RoPE) for _, m in model.named_modules())  # queries and keys
    assert norms > LAYERS and ropes == 2 * LAYERS

    assert patch.use_fast_kernels(model) is True
    assert patch.use_fast_kernels(model) is True  # once per process; a second call is a no-op
    out = model(x)
    mx.eval(out)
    assert spy == {"attention": LAYERS, "swiglu": LAYERS, "ext.attention": LAYERS, "ext.swiglu": LAYERS,
                   "ext.rms_norm": norms, "ext.rope": ropes}
    np.testing.assert_allclose(np.array(out), np.array(reference), **OUT_TOL)

    patch.restore_all()
    spy.clear()
    again = model(x)
    mx.eval(again)
    assert sum(spy.values()) == 0
    np.testing.assert_array_equal(np.array(again), np.array(reference))


@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_match_through_the_fused_kernels(fast, spy, arch):
    _same_loss_and_gradients_once_patched(from_config(_config(arch), seed=2), _tokens(1), _tokens(2))
    assert spy["ext.attention"] == LAYERS and spy["ext.swiglu"] == LAYERS


def _same_loss_and_gradients_once_patched(model, x, y) -> None:
    """The model's cross-entropy and its gradients, before and after `use_fast_kernels`, agree."""
    from mlx.utils import tree_flatten

    def loss(model, x, y):
        return nn.losses.cross_entropy(model(x), y).mean()

    results = []
    for patched in (False, True):
        if patched:
            patch.use_fast_kernels(model)
        value, g = nn.value_and_grad(model, loss)(model, x, y)
        mx.eval(value, g)
        results.append((value.item(), dict(tree_flatten(g))))
    (v0, g0), (v1, g1) = results
    assert v1 == pytest.approx(v0, rel=1e-5)
    for k in g0:
        np.testing.assert_allclose(np.array(g1[k]), np.array(g0[k]), rtol=1e-3, atol=1e-5, err_msg=k)


def test_generation_with_a_cache_keeps_mlx_lm_attention(fast, spy):
    """With a KV cache (generation) attention stays mlx-lm's; SwiGLU still takes the kernel."""
    from mlx_lm.models.cache import make_prompt_cache

    model = from_config(_config("qwen3"), seed=3)
    x = _tokens(3, (1, 10))
    reference = model(x, cache=make_prompt_cache(model))
    mx.eval(reference)
    patch.use_fast_kernels(model)
    out = model(x, cache=make_prompt_cache(model))
    mx.eval(out)
    assert spy["attention"] == 0 and spy["ext.attention"] == 0
    assert spy["ext.swiglu"] == LAYERS
    np.testing.assert_allclose(np.array(out), np.array(reference), **OUT_TOL)


# ------------------------------------------------------- projection groups (any device)
@pytest.fixture
def grouping(monkeypatch):
    """`MLXFLOW_LEAN_LINEAR=on` (the CUDA default) with every input training-sized; counts the
    projections computed together, by group size (`.trained`: those that took the weight-gradients-first
    variant, `lean_projections_trained`)."""
    monkeypatch.setenv("MLXFLOW_LEAN_LINEAR", "on")
    monkeypatch.setattr(kernels, "LEAN_MIN_ELEMENTS", 1)
    sizes = Counter()
    sizes.trained = Counter()
    lean, trained = kernels.lean_projections, kernels.lean_projections_trained
    monkeypatch.setattr(kernels, "lean_projections", lambda x, *ws: sizes.update([len(ws)]) or lean(x, *ws))
    monkeypatch.setattr(kernels, "lean_projections_trained",
                        lambda x, *ws: sizes.update([len(ws)]) or sizes.trained.update([len(ws)]) or trained(x, *ws))
    return sizes


# attention's q / k / v (not qwen2's: biased) and the MLP's gate / up (not qwen3_moe's sparse blocks)
GROUPED = {"llama": {3: LAYERS, 2: LAYERS}, "qwen2": {2: LAYERS}, "qwen3": {3: LAYERS, 2: LAYERS},
           "qwen3_moe": {3: LAYERS}}


@pytest.mark.parametrize("arch", ARCHS)
def test_projection_groups_are_computed_together_with_mlx_lm_results(grouping, arch):
    """Each family's q / k / v and gate / up projections run as one `lean_projections` (one input
    gradient, summed in the products' epilogues), with mlx-lm's loss and gradients; restore_all
    gives the layers their classes back."""
    model = from_config(_config(arch), seed=4)
    classes = {name: type(m) for name, m in model.named_modules()}
    _same_loss_and_gradients_once_patched(model, _tokens(4), _tokens(5))
    assert dict(grouping) == GROUPED[arch] == dict(grouping.trained)  # trained weights: their gradients first
    patch.restore_all()
    assert {name: type(m) for name, m in model.named_modules()} == classes


def test_a_group_member_called_on_another_input_computes_its_own(grouping):
    """Cross-attention's keys and values come from another input: only the projection called on
    the group's input takes the shared result; the others compute theirs, so results are unchanged."""

    class CrossAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = (nn.Linear(16, 16, bias=False) for _ in range(3))

        def __call__(self, x, memory):
            q, k, v = self.q_proj(x), self.k_proj(memory), self.v_proj(memory)
            return mx.softmax(q @ k.swapaxes(-1, -2), axis=-1) @ v

    layer = CrossAttention()
    x, memory = (mx.random.normal((2, 5, 16), key=mx.random.key(i)) for i in range(2))
    reference = layer(x, memory)
    patch.use_fast_kernels(layer)
    assert type(layer).__name__ == "GroupedCrossAttention"
    np.testing.assert_allclose(np.array(layer(x, memory)), np.array(reference), rtol=1e-6, atol=1e-6)
    assert dict(grouping) == {3: 1}


def test_a_group_with_an_adapter_or_off_computes_each_projection(grouping, monkeypatch):
    """A LoRA adapter on one member (added after the patch), or `MLXFLOW_LEAN_LINEAR=off`: each
    projection computes its own product, with the same results."""
    from mlx_lm.tuner.lora import LoRALinear

    model = from_config(_config("llama"), seed=5)
    x = _tokens(6)
    patch.use_fast_kernels(model)
    monkeypatch.setenv("MLXFLOW_LEAN_LINEAR", "off")
    reference = model(x)
    assert sum(grouping.values()) == 0
    monkeypatch.setenv("MLXFLOW_LEAN_LINEAR", "on")
    for layer in model.layers:
        layer.self_attn.q_proj = LoRALinear.from_base(layer.self_attn.q_proj, r=4)
    np.testing.assert_allclose(np.array(model(x)), np.array(reference), rtol=1e-5, atol=1e-5)
    assert dict(grouping) == {2: LAYERS}  # the MLPs' gate / up only
    grouping.clear(), grouping.trained.clear()
    model.freeze()  # frozen bases (the adapters' setup): no gradient of theirs may be made wanted
    model(x)
    assert dict(grouping) == {2: LAYERS} and not grouping.trained
    model.layers[0].mlp.up_proj.unfreeze()  # one trained member is not enough: its partner's is not wanted
    grouping.clear()
    model(x)
    assert dict(grouping) == {2: LAYERS} and not grouping.trained
