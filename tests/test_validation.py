"""Config validation: every wrong value is a one-line error naming the field, before any compile.

The fuzz test sets seeded random wrong values (out of range, wrong sign, misspelt enum
strings, None, NaN) on many fields, alone and several at once; each must be refused with
a line that names every wrong field. Valid but unusual values must pass.
"""

import json
import os

import ml_collections
import numpy as np
import pytest
from cli import run_main

from configs import test as test_config
from metapix_jax import validation
from metapix_jax import workdir as workdir_lib
from metapix_jax.validation import ConfigError

# Field -> wrong values (chosen by hand from the README and the paper, not from the rules).
WRONG = {
    "mode": ["bogus", "", None, "Train"],
    "method": ["metapixx", "", None, "MetaPix"],
    "seed": [-1, None],
    "nonfinite": ["ignore", "", None],
    "data.height": [0, -16, None],
    "data.width": [0, -32],
    "data.source_batch": [0, -2, None],
    "data.target_batch": [0, -1],
    "data.eval_batch": [0],
    "data.ignore_label": [-1, 256, 1000, 0, 254],
    "data.num_classes": [2, 18, 1000],
    "data.normalization": ["IMAGENET", "", "torch", None],
    "data.num_threads": [0, -4],
    "data.synthetic_harm_rate": [1.5, -0.1, float("nan")],
    "data.synthetic_confusions": ["sidewalk-road", "a>b>c", "sidewalk>raod", None],
    "model.split_block": [6, -1, 99, None],
    "model.dtype": ["float16", "fp32", None, "bf16"],
    "model.dropout": [1.0, -0.1, 2.0],
    "model.width": [0.0, -1.0, float("inf")],
    "model.fc6_padding": ["same", "valid", "FULL"],
    "weighting.kind": ["w2", "W1", None, "w20"],
    "weighting.depth": [0, -1],
    "weighting.normalization": ["mean", "Batch", None, "per_class"],
    "meta.inner_optimizer": ["SGD", "momentum", None],
    "meta.learning_rate": [0.0, -1e-3, float("nan")],
    "loss.source_normalization": ["mean", "ALL", None],
    "loss.target_normalization": ["sum", ""],
    "schedule.joint_steps": [-1, -100, None],
    "schedule.meta_steps": [-2],
    "schedule.weighted_steps": [-1],
    "schedule.generations": [-1],
    "optim.learning_rate": [0.0, -1e-4, float("nan"), float("inf")],
    "optim.b1": [1.0, -0.5],
    "optim.b2": [1.0, 1.5],
    "optim.eps": [0.0, -1e-8],
    "log_every": [0, -5],
    "checkpoint_every": [-1],
    "keep_periodic": [0],
    "eval_checkpoint": [-2],
    "data.source_kind": ["GTA5", "synthia16", None],
    "data.eval_protocol": ["official", "1024x512"],
    "data.target_format": ["tfrecord", "folders"],
    "data.num_workers": [-1],
    "loss.kind": ["cross_entropy", "Focal"],
    "loss.focal_gamma": [-1.0],
    "fda.beta": [-0.01, 0.9],
    "minent.weight": [-1e-3],
    "predict.overlay": [1.5, -0.2],
    "predict.weights_for": ["target", "sources"],
    "init.vgg16": ["/nonexistent/vgg16.pth"],
    "data.source_list": ["/nonexistent/list.txt"],
    "data.synthetic_harm": ["spacial", "Confusion", None],
    "data.synthetic_spatial_rate": [1.5, float("nan")],
    "data.synthetic_spatial_px": [0, -2],  # 1.5: the flag parser refuses a float.
    "data.synthetic_noise_rate": [-0.1, 2.0],
    "data.synthetic_appearance": ["car-truck", "car>lorry", "*>car", None],
    "data.synthetic_appearance_rate": [float("inf"), -1.0],
}

# Valid but unusual values: must pass.
UNUSUAL = {
    "model.split_block": [0, 5],
    "schedule.meta_steps": [0],
    "schedule.generations": [0],
    "nonfinite": ["skip"],
    "data.normalization": ["caffe"],
    "model.dtype": ["bfloat16"],
    "weighting.kind": ["w19"],
    "weighting.normalization": ["batch", "class"],
    "meta.inner_optimizer": ["adam"],
    "data.synthetic_confusions": ["", "*>*", "car>*"],
    "checkpoint_every": [0],
    "image_every": [0],
    "data.source_kind": ["synthia"],
    "data.eval_protocol": ["resized"],
    "loss.kind": ["focal"],
    "fda.beta": [0.0],
    "data.synthetic_harm": ["spatial", "noise", "appearance", "none"],
    "data.synthetic_appearance": ["", "*>*", "car>*"],
    "data.synthetic_spatial_px": [1, 6],
}


def tiny_config(**fields):
    base = test_config.get_config()
    base.mode = "train"
    # Not type-safe: tests may set any type (e.g. None where a flag parser would refuse).
    config = ml_collections.ConfigDict(
        base.copy_and_resolve_references().to_dict(), type_safe=False
    )
    for field, value in fields.items():
        parent, _, name = field.rpartition(".")
        (validation.lookup(config, parent) if parent else config)[name] = value
    return config


def check(config, workdir="/nonexistent", devices=1) -> None:
    validation.validate(config, workdir, devices=devices)


def test_the_shipped_configs_are_valid():
    check(tiny_config())
    from configs import default, demo

    check(demo.get_config())
    real = default.get_config()
    with pytest.raises(ConfigError, match="config.data.source_root is empty"):
        check(real)


def test_fuzz_wrong_values_each_named_in_a_one_line_error():
    rng = np.random.default_rng(20240601)
    fields = sorted(WRONG)
    cases = [{f: v} for f in fields for v in WRONG[f]]  # Every value once, alone.
    for _ in range(25):  # And seeded random combinations of two to four at once.
        chosen = rng.choice(fields, size=int(rng.integers(2, 5)), replace=False)
        cases.append({f: WRONG[f][rng.integers(len(WRONG[f]))] for f in chosen})
    for case in cases:
        with pytest.raises(ConfigError) as error:
            check(tiny_config(**case))
        lines = str(error.value).splitlines()
        for field in case:
            named = [line for line in lines if f"config.{field}" in line]
            # An invalid schedule length hides the derived "empty schedule" line, never its own.
            assert named, (case, lines)
            assert "must" in named[0], named


def test_fuzz_unusual_but_valid_values_pass():
    for field, values in UNUSUAL.items():
        for value in values:
            check(tiny_config(**{field: value}))


def test_batches_must_split_over_the_devices():
    with pytest.raises(ConfigError, match=r"data.source_batch=2 must be a multiple of the 3"):
        check(tiny_config(), devices=3)


def test_empty_schedule_and_unknown_compare_method():
    config = tiny_config(**{"schedule.joint_steps": 0, "schedule.generations": 0})
    with pytest.raises(ConfigError, match="the schedule has no steps"):
        check(config)
    config = tiny_config(mode="compare", compare_methods=("metapix", "oracle"))
    with pytest.raises(ConfigError, match="compare_methods: 'oracle' must be one of"):
        check(config)


def test_real_data_roots_must_exist(tmp_path):
    config = tiny_config(**{"data.synthetic": False, "data.target_root": str(tmp_path)})
    config.data.source_root = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match="data.source_root=.*missing' is not a directory"):
        check(config)
    config.method = "target_only"  # Needs no source.
    check(config)


def test_predict_needs_input_or_weight_maps():
    with pytest.raises(ConfigError, match="config.predict.input is empty"):
        check(tiny_config(mode="predict"))


def test_eval_needs_a_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint in"):
        check(tiny_config(mode="eval"), str(tmp_path))
    os.makedirs(tmp_path / "checkpoints" / "7")
    os.makedirs(tmp_path / "checkpoints" / "9.orbax-checkpoint-tmp-1")  # Not a checkpoint.
    check(tiny_config(mode="eval"), str(tmp_path))


def test_config_changes_list_the_fields_and_skip_the_exempt_ones(tmp_path):
    config = tiny_config()
    with open(tmp_path / "config.json", "w") as f:
        f.write(config.to_json_best_effort())
    assert workdir_lib.check_config_unchanged(tiny_config(log_every=7, mode="eval"), tmp_path) == []
    # Fields of a mode that does not train, new or changed, never block a resume.
    predicting = tiny_config(**{"predict.overlay": 0.5, "predict.label_ids": True})
    assert workdir_lib.check_config_unchanged(predicting, tmp_path) == []
    changed = tiny_config(**{"model.width": 0.5, "schedule.meta_steps": 9})
    with pytest.raises(ConfigError) as error:
        workdir_lib.check_config_unchanged(changed, str(tmp_path))
    message = str(error.value)
    assert "model.width: 0.0625 -> 0.5" in message and "schedule.meta_steps: 2 -> 9" in message
    assert "log_every" not in message and "\n" not in message
    changed.allow_config_change = True
    assert len(workdir_lib.check_config_unchanged(changed, str(tmp_path))) == 2


def test_a_config_json_from_before_a_field_existed_resumes_with_its_old_behaviour(tmp_path):
    """Fields added later (workdir.ADDED_FIELDS) count as the value the old code used."""
    config = tiny_config()
    saved = json.loads(config.to_json_best_effort())
    for field in workdir_lib.ADDED_FIELDS:
        group, name = field.split(".")
        del saved[group][name]
    with open(tmp_path / "config.json", "w") as f:
        json.dump(saved, f)
    assert workdir_lib.check_config_unchanged(config, str(tmp_path)) == []
    config.data.synthetic_harm = "noise"
    with pytest.raises(ConfigError, match="data.synthetic_harm: 'confusion' -> 'noise'"):
        workdir_lib.check_config_unchanged(config, str(tmp_path))


def test_main_reports_every_problem_as_a_line_without_a_traceback(tmp_path):
    proc = run_main(
        "--config=configs/test.py",
        f"--workdir={tmp_path}",
        "--config.method=metapixx",
        "--config.model.split_block=7",
        "--config.data.normalization=torch",
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()[-3:]
    assert lines[0].startswith("ConfigError: config.method='metapixx' must be one of (")
    assert "config.data.normalization='torch' must be one of ('imagenet', 'caffe')" in lines[1]
    assert "config.model.split_block=7 must be an integer in 0..5" in lines[2]
    assert not os.listdir(tmp_path)  # Nothing written.


# ---- every field of configs/default.py, every kind of wrong value --------------------------

NAN, INF = float("nan"), float("inf")


def wrong_kind_values(default, rng: np.random.Generator) -> list:
    """Values of the wrong kind for a field whose default is `default`, some drawn at random."""
    huge = int(rng.integers(1, 2**62)) * 2**64  # Beyond int64, whatever the sign.
    common = [None, [1], {"a": 1}]
    if isinstance(default, bool):
        return common + [1, "yes", float(rng.random())]
    if isinstance(default, int):
        return common + [float(rng.random()) + 0.5, "3", True, huge, -huge]
    if isinstance(default, float):
        return common + [NAN, INF, -INF, -NAN, "0.1", True]
    if isinstance(default, str):
        return common + [int(rng.integers(-9, 9)), float(rng.random()), True, b"bytes"]
    if isinstance(default, tuple):
        return common + ["metapix", (1, 2)]
    raise AssertionError(f"a field of a kind this test does not know: {default!r}")


def out_of_rule_values(field: str, default, rng: np.random.Generator) -> list:
    """Random values of the field's kind that its rule (FIELD_RULES) refuses."""
    rule = validation.FIELD_RULES.get(field)
    if rule is None or isinstance(default, (bool, tuple)):
        return []
    if isinstance(default, int):
        draws = [int(v) for v in rng.integers(-(2**40), 2**40, size=40)]
        draws += [int(v) for v in rng.integers(-3, 3, size=10)] + [2**32, 2**63 - 1]
    elif isinstance(default, float):
        draws = [float(v) for v in rng.normal(0, 10, size=40)] + [-1e300, 1e300, 0.0, 1.0]
    else:
        letters = list("abcdefghijklmnopqrstuvwxyz_01")
        draws = ["".join(rng.choice(letters, size=int(rng.integers(0, 9)))) for _ in range(20)]
        draws += [default.upper(), default + " ", ""]
    return [v for v in draws if rule(v)][:6]


def assert_named_in_one_line(config, field: str, value) -> None:
    with pytest.raises(ConfigError) as error:
        check(config)
    lines = str(error.value).splitlines()
    named = [
        line for line in lines if line.startswith(f"config.{field}=") or f"config.{field}" in line
    ]
    assert named, (field, value, lines)
    assert "must" in named[0] or "too" in named[0], (field, value, named)


def test_fuzz_every_field_of_the_default_config_refuses_each_kind_of_wrong_value(caplog):
    """The field list comes from configs/default.py itself: a new field is covered at once."""
    import jax

    jax.config.update("jax_log_compiles", True)
    rng = np.random.default_rng(16)
    fields = validation.default_values()
    assert len(fields) > 100  # The walk found the groups' fields, not only the top level.
    cases = 0
    try:
        for field, default in fields.items():
            for value in wrong_kind_values(default, rng) + out_of_rule_values(field, default, rng):
                config = tiny_config(**{field: value})
                if validation.shown(validation.lookup(config, field)) != repr(value):
                    continue  # ConfigDict cast it (True -> 1.0 for a float): not a wrong value.
                assert_named_in_one_line(config, field, value)
                cases += 1
    finally:
        jax.config.update("jax_log_compiles", False)
    assert cases > 8 * len(fields)
    assert "Compiling" not in caplog.text  # Validation compiled nothing.


def test_a_wrong_value_alone_is_exactly_one_line():
    for field, value in [
        ("weighting.init_bias", NAN),
        ("meta.inner_learning_rate", INF),
        ("seed", 99999999999999999999),
        ("process_id", 5),
        ("data.height", 0),
        ("model.remat", "yes"),
        ("data.source_root", None),
    ]:
        config = tiny_config(
            **{field: value, "num_processes": 2} if field == "process_id" else {field: value}
        )
        with pytest.raises(ConfigError) as error:
            check(config)
        assert len(str(error.value).splitlines()) == 1, str(error.value)
        assert f"config.{field}" in str(error.value)


def test_seeds_are_the_32_bits_that_jax_keys_keep():
    check(tiny_config(seed=2**32 - 1))
    with pytest.raises(
        ConfigError, match=r"config.seed=4294967296 must be an integer in 0..4294967295"
    ):
        check(tiny_config(seed=2**32))


def test_process_ids_name_one_of_the_processes():
    check(tiny_config(num_processes=2, process_id=1))
    check(tiny_config(num_processes=-1, process_id=3))  # The count comes from the environment.
    with pytest.raises(
        ConfigError, match=r"config.process_id=2 must be below config.num_processes=2"
    ):
        check(tiny_config(num_processes=2, process_id=2))
    with pytest.raises(ConfigError, match=r"config.num_processes=0 must be an integer >= 1, or -1"):
        check(tiny_config(num_processes=0))


def test_a_schedule_longer_than_an_int32_position_is_refused():
    with pytest.raises(ConfigError, match=r"at most 2147483647 \(the position is an int32\)"):
        check(tiny_config(**{"schedule.joint_steps": 2**31}))


# ---- the shapes the networks can take: validation's rules against the models themselves -----


def fcn_builds(height: int, width: int, kernel: int) -> bool:
    """Whether FCN-8s with a VALID k x k fc6 traces on a height x width image (shapes only)."""
    import jax
    import jax.numpy as jnp

    from metapix_jax.models.fcn8s import FCN8s

    model = FCN8s(width=1 / 32, fc_dim=32, fc6_kernel=kernel, fc6_padding="VALID", dropout=0.0)
    x = jnp.zeros((1, height, width, 3))
    try:
        jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, x))
    except IndexError:  # models/resize.py on the empty map fc6 leaves.
        return False
    return True


@pytest.mark.parametrize("kernel", [1, 2, 3, 7])
def test_fc6_valid_needs_pool5_at_least_its_kernel(kernel):
    """The boundary side 32 (k - 1) + 1 builds and passes; one pixel less fails both."""
    fits = 32 * (kernel - 1) + 1
    fields = {"model.fc6_padding": "VALID", "model.fc6_kernel": kernel}
    for height, width in [(fits, fits + 40), (fits + 40, fits)]:
        assert fcn_builds(height, width, kernel)
        check(tiny_config(**fields, **{"data.height": height, "data.width": width}))
    if kernel > 1:
        for height, width in [(fits - 1, fits + 40), (fits + 40, fits - 1)]:
            assert not fcn_builds(height, width, kernel)
            config = tiny_config(**fields, **{"data.height": height, "data.width": width})
            with pytest.raises(ConfigError, match="too small for config.model.fc6_kernel"):
                check(config)


def deepest_level_learns(height: int, width: int, depth: int) -> bool:
    """Whether the U-Net's deepest level gets any gradient on a height x width image."""
    import jax
    import jax.numpy as jnp

    from metapix_jax.models.unet import WeightingUNet

    unet = WeightingUNet(base_channels=2, depth=depth)
    image = jax.random.normal(jax.random.PRNGKey(1), (1, height, width, 3))
    label = jnp.zeros((1, height, width), jnp.int32)
    params = jax.jit(lambda: unet.init(jax.random.PRNGKey(0), image, label))()
    ramp = jnp.arange(height * width, dtype=jnp.float32).reshape(1, height, width)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(unet.apply(p, image, label) * ramp)))(params)
    return any(bool(jnp.any(g != 0)) for g in jax.tree.leaves(grads["params"][f"down{depth}"]))


@pytest.mark.parametrize("height,width,depth", [(4, 5, 2), (1, 3, 1), (8, 9, 3)])
def test_unet_depth_needs_two_pixels_at_its_deepest_level(height, width, depth):
    """At the boundary the deepest level learns; one pixel less and it is a constant 0."""
    fields = {"weighting.depth": depth, "model.fc6_padding": "SAME"}
    assert deepest_level_learns(height, width, depth)
    check(tiny_config(**fields, **{"data.height": height, "data.width": width}))
    smaller = (height, width - 1)
    assert not deepest_level_learns(*smaller, depth)
    with pytest.raises(ConfigError, match="is too deep for config.data.height"):
        check(tiny_config(**fields, **{"data.height": smaller[0], "data.width": smaller[1]}))


# ---- the same through main.py: one line, status 1, nothing compiled -------------------------


def test_main_refuses_bad_values_in_one_line_before_compiling(tmp_path):
    text = tmp_path / "not_weights.pth"
    text.write_text("these are not weights\n")
    cases = [
        (["--config.seed=99999999999999999999"], "config.seed=99999999999999999999 must be"),
        (["--config.weighting.init_bias=nan"], "config.weighting.init_bias=nan must be a finite"),
        (["--config.data.height=1", "--config.model.fc6_padding=VALID"], "too small for"),
        (["--config.num_processes=2", "--config.process_id=2"], "config.process_id=2 must be"),
        ([f"--config.init.vgg16={text}", "--config.model.width=1.0"], "is not a weight file"),
        (["--config.weighting.depth=9"], "config.weighting.depth=9 is too deep"),
    ]
    for args, expected in cases:
        proc = run_main(
            "--config=configs/test.py",
            f"--workdir={tmp_path / 'run'}",
            "--config.mode=train",
            *args,
            env={"JAX_LOG_COMPILES": "1"},
        )
        assert proc.returncode == 1, (args, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr and "Compiling" not in proc.stderr, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert lines[0].startswith("ConfigError: "), lines
        # One line per wrong field: data.synthetic_seed follows config.seed (configs/demo.py).
        assert len(lines) == (2 if "seed" in args[0] else 1), lines
        assert all(line.removeprefix("ConfigError: ").startswith("config.") for line in lines)
        assert expected in lines[-1], (expected, lines)
    assert not os.path.exists(tmp_path / "run")  # Nothing written.
