"""Data parallelism, multi-process start-up, bf16 compute, remat and donated buffers."""

import json
import os
import subprocess
import sys

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from configs import test as test_config
from metapix_jax import methods, parallel
from metapix_jax import state as state_lib
from metapix_jax import steps as steps_lib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
REMAT_PRIMITIVES = ("remat2", "checkpoint")  # jax.checkpoint's primitive, by jax version.


def config_with(**model):
    config = test_config.get_config()
    for key, value in model.items():
        section, field = key.split("__")
        config[section][field] = value
    return config


def inputs(config, seed=0):
    rng = np.random.default_rng(seed)
    b, h, w = 2, config.data.height, config.data.width
    image = jnp.asarray(rng.normal(size=(b, h, w, 3)), jnp.float32)
    label = jnp.asarray(rng.integers(0, 19, (b, h, w)), jnp.int32)
    return image, label.at[:, 0].set(255)


# ---- several devices ----------------------------------------------------------------------


def test_four_devices_give_the_same_steps_as_one():
    """Every step kind and the eval confusion, on 4 fake CPU devices against 1."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="4")
    script = os.path.join(HERE, "parallel_equivalence.py")
    out = subprocess.run(
        [sys.executable, script], env=env, capture_output=True, text=True, timeout=1200
    )
    assert out.returncode == 0, out.stderr[-4000:]
    report = json.loads(out.stdout.split("RESULT ", 1)[1])
    assert report["device_count"] == 4 and report["mesh_devices"] == [1, 4]
    assert report["position"] == [8, 8]
    # Float32 sums in another order (per-device partial sums, then the all-reduce).
    for name in ("params", "unet_params", "opt_state", "metrics"):
        assert report[name] < 1e-4, (name, report)
    assert report["confusion_equal"] and report["confusion_total"] > 0
    assert "data.source_batch=6" in report["batch_error"]
    assert "4 devices" in report["batch_error"]


# ---- multi-process start-up ---------------------------------------------------------------


@pytest.fixture
def no_launcher(monkeypatch):
    """An environment that names no coordinator and no process count."""
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_PROCESS_ID", *parallel.PROCESS_COUNT_VARIABLES):
        monkeypatch.delenv(var, raising=False)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    return calls


def test_auto_stays_single_process_without_a_launcher(no_launcher):
    assert not parallel.initialize_distributed(test_config.get_config())
    assert no_launcher == []


def test_off_never_initialises(no_launcher, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1234")
    config = test_config.get_config()
    config.distributed = "off"
    assert not parallel.initialize_distributed(config)
    assert no_launcher == []


def test_auto_initialises_from_the_environment(no_launcher, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "host0:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    assert parallel.initialize_distributed(test_config.get_config())
    assert no_launcher == [
        {
            "coordinator_address": None,
            "num_processes": 4,
            "process_id": 3,
            "heartbeat_timeout_seconds": 60,
        }
    ]


def test_config_fields_override_the_environment(no_launcher, monkeypatch):
    monkeypatch.setenv("SLURM_NTASKS", "8")
    config = test_config.get_config()
    config.coordinator_address, config.num_processes, config.process_id = "h:9", 2, 1
    assert parallel.initialize_distributed(config)
    assert no_launcher == [
        {
            "coordinator_address": "h:9",
            "num_processes": 2,
            "process_id": 1,
            "heartbeat_timeout_seconds": 60,
        }
    ]


def test_a_single_slurm_task_is_not_multi_process(no_launcher, monkeypatch):
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert not parallel.initialize_distributed(test_config.get_config())


def test_unknown_distributed_mode_is_a_clear_error(no_launcher):
    config = test_config.get_config()
    config.distributed = "yes"
    with pytest.raises(ValueError, match=r"distributed must be one of \('auto', 'on', 'off'\)"):
        parallel.initialize_distributed(config)


# ---- bf16 ---------------------------------------------------------------------------------


def equations(fn, *args) -> list:
    """Every equation of fn's jaxpr, those of nested jaxprs included."""
    found = []

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            found.append(eqn)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                visit(sub)

    visit(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def conv_dtypes(fn, *args) -> dict[int, set[str]]:
    """{output channels: input dtypes} over every convolution in fn (nested ones included)."""
    found = {}
    for e in equations(fn, *args):
        if e.primitive.name == "conv_general_dilated":
            channels = e.outvars[0].aval.shape[-1]
            found.setdefault(channels, set()).update(str(v.aval.dtype) for v in e.invars)
    return found


def test_bf16_computes_convolutions_in_bf16_with_float32_params():
    config = config_with(model__dtype="bfloat16")
    image, label = inputs(config)
    model, unet = state_lib.make_segmenter(config), state_lib.make_weighting_net(config)
    state = state_lib.init_state(config)
    for tree in (state.params, state.unet_params, state.opt_state, state.unet_opt_state):
        assert {x.dtype for x in jax.tree.leaves(tree) if x.ndim} == {jnp.dtype("float32")}
    fcn = lambda p: model.apply({"params": p}, image, image)  # noqa: E731
    net = lambda p: unet.apply({"params": p}, image, label)  # noqa: E731
    # The trunks in bf16; the class-score head and the U-Net's output conv in float32.
    fcn_convs, unet_convs = conv_dtypes(fcn, state.params), conv_dtypes(net, state.unet_params)
    assert fcn_convs.pop(config.data.num_classes) == {"float32"}
    assert unet_convs.pop(2) == {"float32"}  # W1: two logits per pixel.
    assert fcn_convs and set().union(*fcn_convs.values()) == {"bfloat16"}
    assert unet_convs and set().union(*unet_convs.values()) == {"bfloat16"}
    logits_s, logits_t = fcn(state.params)
    assert logits_s.dtype == logits_t.dtype == net(state.unet_params).dtype == jnp.float32


def test_bf16_forward_matches_float32():
    """Same params, bf16 against float32 compute: within 5% of the output's scale."""
    f32, bf16 = config_with(), config_with(model__dtype="bfloat16")
    image, label = inputs(f32)
    params = state_lib.init_segmenter_params(f32, jax.random.key(0))
    unet_params = state_lib.init_weighting_params(f32, jax.random.key(1))
    outputs = {}
    for config in (f32, bf16):
        model, unet = state_lib.make_segmenter(config), state_lib.make_weighting_net(config)
        outputs[config.model.dtype] = {
            "fcn": model.apply({"params": params}, None, image)[1],
            "unet": unet.apply({"params": unet_params}, image, label),
        }
    for name in ("fcn", "unet"):
        a, b = outputs["float32"][name], outputs["bfloat16"][name]
        scale = float(jnp.abs(a).max())
        assert scale > 0
        assert float(jnp.abs(a - b).max()) < 0.05 * scale, name
        assert float(jnp.abs(a - b).max()) > 0, name  # bf16 really ran.


def test_a_bf16_train_step_keeps_float32_params_and_optimiser_state():
    config = config_with(model__dtype="bfloat16")
    mesh = parallel.make_mesh()
    weighted = methods.compile_steps(config, mesh, ["weighted"])["weighted"]
    state = parallel.put_replicated(state_lib.init_state(config), mesh)
    image, label = inputs(config)
    batch = {"source_image": image, "source_label": label}
    batch.update(target_image=image[::-1], target_label=label[::-1])
    state, metrics = weighted(state, parallel.to_global(jax.device_get(batch), mesh))
    assert metrics["loss"].dtype == jnp.float32 and np.isfinite(float(metrics["loss"]))
    for tree in (state.params, state.unet_params, state.opt_state, state.unet_opt_state):
        assert {x.dtype for x in jax.tree.leaves(tree) if x.ndim} == {jnp.dtype("float32")}


# ---- remat --------------------------------------------------------------------------------


def loss_and_grads(config, seed=0):
    """Joint segmenter loss and its gradient, and a U-Net output's gradient."""
    image, label = inputs(config, seed)
    model, unet = state_lib.make_segmenter(config), state_lib.make_weighting_net(config)
    params = state_lib.init_segmenter_params(config, jax.random.key(0))
    unet_params = state_lib.init_weighting_params(config, jax.random.key(1))
    batch = {"source_image": image, "source_label": label}
    batch.update(target_image=image[::-1], target_label=label[::-1])

    def segmenter(p):
        return steps_lib.joint_loss(
            p, batch, jax.random.key(2), model=model, config=config,
            weights=jnp.full(label.shape, 0.5),
        )[0]  # fmt: skip

    def weighting(p):
        return jnp.sum(unet.apply({"params": p}, image, label) * jnp.arange(label.shape[-1]))

    seg = jax.value_and_grad(segmenter)
    unet_grad = jax.value_and_grad(weighting)
    remats = [
        sum(e.primitive.name in REMAT_PRIMITIVES for e in equations(fn, p))
        for fn, p in ((segmenter, params), (weighting, unet_params))
    ]
    return seg(params), unet_grad(unet_params), remats


def test_remat_gives_the_same_loss_and_gradients():
    plain = loss_and_grads(config_with())
    remat = loss_and_grads(config_with(model__remat=True, weighting__remat=True))
    config = config_with()
    # Every VGG block (the split ones twice: source and target copy) and every double conv.
    vgg_blocks = 5 + config.model.split_block
    unet_blocks = 1 + 2 * config.weighting.depth
    assert plain[2] == [0, 0] and remat[2] == [vgg_blocks, unet_blocks]
    for (value_a, grads_a), (value_b, grads_b) in zip(plain[:2], remat[:2], strict=True):
        np.testing.assert_allclose(value_a, value_b, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                     grads_a, grads_b)  # fmt: skip


# ---- donated buffers ------------------------------------------------------------------------


def test_train_steps_donate_the_input_state():
    """The old state's buffers are reused for the new one (deleted on the host side)."""
    config = test_config.get_config()
    mesh = parallel.make_mesh()
    joint = methods.compile_steps(config, mesh, ["joint"])["joint"]
    image, label = inputs(config)
    batch = {"source_image": image, "source_label": label}
    batch.update(target_image=image, target_label=label)
    batch = parallel.to_global(jax.device_get(batch), mesh)
    state = parallel.put_replicated(state_lib.init_state(config), mesh)
    new_state, _ = joint(state, batch)
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(state))
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(new_state))
    confusion_fn = steps_lib.make_inference(config, mesh).confusion
    confusion = confusion_fn(new_state, parallel.to_global({"image": image, "label": label}, mesh))
    assert int(confusion.sum()) > 0
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(new_state))  # eval keeps it.


# ---- the step benchmark -------------------------------------------------------------------


def test_step_timing_imports_no_tensorflow_clu_or_grain():
    """benchmarks/step_timing.py must run on a GPU host with only jax, flax and optax."""
    code = (
        "import runpy, sys; runpy.run_path('benchmarks/step_timing.py', run_name='x'); "
        "print(sorted(m for m in ('tensorflow', 'clu', 'grain') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
