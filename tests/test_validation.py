"""Config validation: every wrong value is a one-line error naming the field, before any compile.

The fuzz test sets seeded random wrong values (out of range, wrong sign, misspelt enum
strings, None, NaN) on many fields, alone and several at once; each must be refused with
a line that names every wrong field. Valid but unusual values must pass.
"""

import json
import os

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
    config = test_config.get_config()
    config.mode = "train"
    config.unlock()  # Tests may set any type (e.g. None where a flag parser would refuse).
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
