"""The training state pytree, the two networks and their optimisers.

One state holds both networks so that every step is `(state, batch) -> (state, metrics)`
and one checkpoint restores everything: a step changes only the part it trains.
"""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from metapix_jax.models import pretrained
from metapix_jax.models.fcn8s import FCN8s
from metapix_jax.models.unet import WeightingUNet

PyTree = Any
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue exactly where it stopped."""

    params: PyTree  # Segmenter f_theta.
    opt_state: PyTree
    unet_params: PyTree  # Weighting network f_phi.
    unet_opt_state: PyTree
    rng: jax.Array  # Base key (raw uint32); each step folds in its position.
    step: jax.Array  # Segmenter optimiser steps taken: drives the lr schedule.
    position: jax.Array  # Steps of any kind taken: the position in the schedule.


def compute_dtype(config: ml_collections.ConfigDict) -> jnp.dtype:
    """The activation dtype named by config.model.dtype."""
    if config.model.dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {tuple(DTYPES)}, got {config.model.dtype!r}")
    return DTYPES[config.model.dtype]


def make_segmenter(config: ml_collections.ConfigDict) -> FCN8s:
    """FCN-8s as configured by config.model."""
    m = config.model
    return FCN8s(
        num_classes=config.data.num_classes,
        width=m.width,
        fc_dim=m.fc_dim,
        fc6_kernel=m.fc6_kernel,
        fc6_padding=m.fc6_padding,
        split_block=m.split_block,
        dropout=m.dropout,
        dtype=compute_dtype(config),
        remat=m.remat,
    )


def make_weighting_net(config: ml_collections.ConfigDict) -> WeightingUNet:
    """The U-Net as configured by config.weighting."""
    w = config.weighting
    return WeightingUNet(
        num_classes=config.data.num_classes,
        ignore_label=config.data.ignore_label,
        kind=w.kind,
        base_channels=w.base_channels,
        depth=w.depth,
        init_bias=w.init_bias,
        init_std=w.init_std,
        dtype=compute_dtype(config),
        remat=w.remat,
    )


def total_segmenter_steps(config: ml_collections.ConfigDict) -> int:
    """Segmenter steps of the schedule, N1 + G * N3: the horizon of the lr decay."""
    s = config.schedule
    return s.joint_steps + s.generations * s.weighted_steps


def _is_bias(params: PyTree) -> PyTree:
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "bias", params)


def segmenter_schedule(config: ml_collections.ConfigDict, weighted_phase: bool) -> optax.Schedule:
    """The segmenter's lr by optimiser step: polynomial decay to 0 (paper 4.3).

    Over the whole schedule (N1 + G * N3 segmenter steps), or, for a weighted phase with
    optim.fresh_weighted_optimizer, from weighted_learning_rate over that phase's N3 steps.
    """
    o = config.optim
    if weighted_phase and o.fresh_weighted_optimizer:
        rate, horizon = o.weighted_learning_rate, config.schedule.weighted_steps
    else:
        rate, horizon = o.learning_rate, total_segmenter_steps(config)
    return optax.polynomial_schedule(rate, 0.0, o.poly_power, max(horizon, 1))


def segmenter_optimizer(
    config: ml_collections.ConfigDict, weighted_phase: bool, eps_root: float = 0.0
) -> optax.GradientTransformation:
    """Adam with coupled L2, a 2x bias lr and polynomial decay (paper 4.3, authors' code).

    The weight decay is added to the gradient before Adam (PyTorch Adam's weight_decay),
    which is not AdamW's decoupled decay. The last transformation is the lr schedule, so
    `learning_rate` reads its step count there. `eps_root` > 0 keeps the update
    differentiable where a second moment is zero (the meta step's Adam inner step).
    """
    o = config.optim
    return optax.chain(
        optax.add_decayed_weights(o.weight_decay),
        optax.scale_by_adam(o.b1, o.b2, o.eps, eps_root),
        optax.masked(optax.scale(o.bias_lr_mult), _is_bias),
        optax.scale_by_learning_rate(segmenter_schedule(config, weighted_phase)),
    )


def learning_rate(config: ml_collections.ConfigDict, opt_state: PyTree, weighted_phase: bool):
    """The lr the segmenter optimiser applies at its next update: its schedule at its count."""
    count = opt_state[-1].count  # The chain's last state: scale_by_learning_rate's.
    return segmenter_schedule(config, weighted_phase)(count)


def weighting_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Adam on phi with a constant lr (and optional coupled L2)."""
    m = config.meta
    return optax.chain(
        optax.add_decayed_weights(m.weight_decay),
        optax.scale_by_adam(m.b1, m.b2, m.eps),
        optax.scale_by_learning_rate(m.learning_rate),
    )


def _dummy_inputs(config: ml_collections.ConfigDict) -> tuple[jnp.ndarray, jnp.ndarray]:
    d = config.data
    return jnp.zeros((1, d.height, d.width, 3)), jnp.zeros((1, d.height, d.width), jnp.int32)


def init_segmenter_params(config: ml_collections.ConfigDict, key: jax.Array) -> PyTree:
    """Random segmenter params, both copies of the split blocks included.

    Under jit: one compiled program instead of Flax's op-by-op initialisation (minutes for
    the full model on a CPU); the values are the same bits.
    """
    image, _ = _dummy_inputs(config)
    model = make_segmenter(config)
    return jax.jit(lambda k: model.init(k, image, image)["params"])(key)


def initial_segmenter_params(config: ml_collections.ConfigDict, key: jax.Array) -> PyTree:
    """ImageNet VGG-16 (config.init.vgg16) or random params for the segmenter.

    The import replaces every layer, so its template is only shapes (no random init).
    """
    if not config.init.vgg16:
        return init_segmenter_params(config, key)
    template = jax.eval_shape(lambda k: init_segmenter_params(config, k), key)
    return pretrained.load_vgg16(config.init.vgg16, template, config.model.width)


def init_weighting_params(config: ml_collections.ConfigDict, key: jax.Array) -> PyTree:
    """Fresh U-Net params (Algorithm 1, line 4), initialised under jit."""
    image, label = _dummy_inputs(config)
    unet = make_weighting_net(config)
    return jax.jit(lambda k: unet.init(k, image, label)["params"])(key)


def unet_key(rng: jax.Array, generation: int) -> jax.Array:
    """The key a generation's fresh U-Net is drawn from (same on resume)."""
    return jax.random.fold_in(jax.random.fold_in(rng, 1), generation)


def fresh_weighting(config: ml_collections.ConfigDict, generation: int) -> tuple[PyTree, PyTree]:
    """(U-Net params, their optimiser state) as drawn for `generation` (0-based)."""
    key = unet_key(jax.random.PRNGKey(config.seed), generation)
    unet_params = init_weighting_params(config, key)
    return unet_params, weighting_optimizer(config).init(unet_params)


def init_state(config: ml_collections.ConfigDict) -> TrainState:
    """The state at position 0 of the schedule."""
    rng = jax.random.PRNGKey(config.seed)
    params = initial_segmenter_params(config, jax.random.fold_in(rng, 0))
    unet_params, unet_opt_state = fresh_weighting(config, 0)
    return TrainState(
        params=params,
        opt_state=segmenter_optimizer(config, weighted_phase=False).init(params),
        unet_params=unet_params,
        unet_opt_state=unet_opt_state,
        rng=jax.random.fold_in(rng, 2),
        step=jnp.zeros((), jnp.int32),
        position=jnp.zeros((), jnp.int32),
    )


def state_template(
    config: ml_collections.ConfigDict, sharding: jax.sharding.Sharding
) -> TrainState:
    """The state's shapes and dtypes placed by `sharding`: what a checkpoint restores into.

    Traced, not run, and without reading init.vgg16 (a checkpoint replaces the weights),
    so resuming, evaluating or predicting costs no initialisation. The sharding tells
    Orbax where the arrays go now, which need not be where they were saved (a run
    trained on 8 devices is evaluated on 1).
    """
    no_import = config.copy_and_resolve_references()
    no_import.init.vgg16 = ""
    shapes = jax.eval_shape(lambda: init_state(no_import))
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)
