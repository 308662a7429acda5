"""Every method of the paper's tables in one table: its phases and the step each phase runs.

A method is laid out as Algorithm 1 lays out MetaPix: a first phase of N1 steps
(`schedule.joint_steps`), then G generations (`schedule.generations`) of one or more
phases whose lengths are schedule fields. Every method takes as many segmenter steps as
MetaPix (N1 + G * N3), in phases of the same lengths, so all are checkpointed and
evaluated at comparable points. `schedule.py` lays the phases end to end on one position
axis; the training loop runs each phase's step (`PHASE_KINDS[kind]`).

Adding a method touches this file only:
1. write its step where it belongs (a segmenter loss in steps.py, a U-Net objective in
   its own module) or compose existing steps, as `online_step` below does;
2. add a `PhaseKind` to PHASE_KINDS if it needs a step no other phase runs;
3. add a `Method` to METHODS (in the order the results table should list it).
A method that is another one plus config fields (e.g. MetaPix with W19) is a VARIANTS
entry instead: compare mode accepts its name, the results table names its fields.
Validation, compare mode, results mode and the training loop all read these tables.
"""

import dataclasses
import functools
from collections.abc import Callable

import jax
import ml_collections
import optax
from jax.sharding import Mesh

from metapix_jax import hrselect, meta, nonfinite, parallel, steps
from metapix_jax import state as state_lib
from metapix_jax.models.fcn8s import FCN8s
from metapix_jax.models.unet import WeightingUNet

StepFn = Callable[[state_lib.TrainState, steps.Batch], tuple[state_lib.TrainState, steps.Metrics]]


@dataclasses.dataclass(frozen=True)
class StepParts:
    """What the steps are built from: the networks, the config and the optimisers, once."""

    config: ml_collections.ConfigDict
    model: FCN8s
    unet: WeightingUNet
    main_tx: optax.GradientTransformation  # The segmenter's, over the whole schedule.
    weighted_tx: optax.GradientTransformation  # The segmenter's in weighted-kind phases.
    unet_tx: optax.GradientTransformation  # The U-Net's (meta and heuristic phases).
    inner: meta.InnerStep  # Algorithm 2's differentiable inner step.


def step_parts(config: ml_collections.ConfigDict) -> StepParts:
    """Builds the networks and every optimiser of a config."""
    return StepParts(
        config=config,
        model=state_lib.make_segmenter(config),
        unet=state_lib.make_weighting_net(config),
        main_tx=state_lib.segmenter_optimizer(config, weighted_phase=False),
        weighted_tx=state_lib.segmenter_optimizer(config, weighted_phase=True),
        unet_tx=state_lib.weighting_optimizer(config),
        inner=meta.inner_step(config),
    )


def online_step(state, batch, *, meta_step: StepFn, weighted_step: StepFn):
    """Online MetaPix: a meta step on phi, then a weighted step on theta, on the same batch.

    One schedule position per pair, so the weighted phases keep MetaPix's N3 segmenter
    steps while phi follows theta step by step instead of being learned before it moves.
    The weights of the weighted half are those just updated on this batch; the meta half
    draws its dropout from a separate key so that no mask is used twice.
    """
    meta_state, meta_metrics = meta_step(state.replace(rng=jax.random.fold_in(state.rng, 1)), batch)
    new_state, metrics = weighted_step(meta_state.replace(rng=state.rng), batch)
    return new_state, {**meta_metrics, **metrics}


def _joint(p: StepParts, tx) -> StepFn:
    return functools.partial(steps.joint_step, model=p.model, tx=tx, config=p.config)


def _weighted(p: StepParts, tx) -> StepFn:
    return functools.partial(
        steps.weighted_step, model=p.model, unet=p.unet, tx=tx, config=p.config
    )


def _meta(p: StepParts, tx) -> StepFn:
    del tx  # The meta step never changes the segmenter.
    return functools.partial(
        meta.meta_step,
        model=p.model,
        unet=p.unet,
        inner=p.inner,
        unet_tx=p.unet_tx,
        config=p.config,
    )


@dataclasses.dataclass(frozen=True)
class PhaseKind:
    """One kind of phase: the step it runs and what the loop does around it."""

    # (parts, the segmenter optimiser of this kind) -> the step, not yet jitted.
    build: Callable[[StepParts, optax.GradientTransformation], StepFn]
    changes_segmenter: bool = True  # False: nothing to evaluate after the phase.
    learns_weights: bool = False  # Trains the U-Net: a fresh one per generation if asked.
    weighted_optimizer: bool = False  # Its segmenter optimiser is the weighted phases' one.
    shows_weights: bool = False  # The U-Net's weights mean something (TensorBoard images).


PHASE_KINDS: dict[str, PhaseKind] = {
    # Algorithm 1, lines 8-13: L_s + L_t, unweighted.
    "joint": PhaseKind(_joint),
    # The target term alone.
    "target": PhaseKind(
        lambda p, tx: functools.partial(steps.target_step, model=p.model, tx=tx, config=p.config)
    ),
    # Algorithm 2: learns phi; theta is left as it is.
    "meta": PhaseKind(_meta, changes_segmenter=False, learns_weights=True, shows_weights=True),
    # Algorithm 3: theta on the source loss weighted by the frozen U-Net, + L_t.
    "weighted": PhaseKind(_weighted, weighted_optimizer=True, shows_weights=True),
    # Table 1's "FCN+finetune": joint steps with the weighted phases' optimiser.
    "finetune": PhaseKind(_joint, weighted_optimizer=True),
    # A meta step and a weighted step per position (online_step).
    "online": PhaseKind(
        lambda p, tx: functools.partial(
            online_step, meta_step=_meta(p, tx), weighted_step=_weighted(p, tx)
        ),
        learns_weights=True,
        weighted_optimizer=True,
        shows_weights=True,
    ),
    # HRSelect's heuristic trains phi (hrselect.py); theta is left as it is.
    "hrselect": PhaseKind(
        lambda p, tx: functools.partial(
            hrselect.hrselect_step, unet=p.unet, unet_tx=p.unet_tx, config=p.config
        ),
        changes_segmenter=False,
        learns_weights=True,
        shows_weights=True,
    ),
    # Joint steps on source images restyled by the target batch (FDA, fda.py).
    "fda": PhaseKind(
        lambda p, tx: functools.partial(steps.fda_step, model=p.model, tx=tx, config=p.config)
    ),
    # Joint steps + minent.weight x the entropy of the target predictions (MinEnt).
    "minent": PhaseKind(
        lambda p, tx: functools.partial(steps.minent_step, model=p.model, tx=tx, config=p.config)
    ),
}


def make_step(kind: str, parts: StepParts) -> StepFn:
    """The step of a phase kind, bound to its networks and optimisers (not yet jitted)."""
    k = PHASE_KINDS[kind]
    return k.build(parts, parts.weighted_tx if k.weighted_optimizer else parts.main_tx)


def advancing(step: Callable) -> Callable:
    """The step, then position + 1: the one place where the schedule position moves."""

    def advanced(state: state_lib.TrainState, batch: steps.Batch):
        new_state, metrics = step(state, batch)
        return new_state.replace(position=state.position + 1), metrics

    return advanced


def compile_steps(config: ml_collections.ConfigDict, mesh: Mesh, kinds) -> dict[str, StepFn]:
    """Each phase kind's step as the training loop runs it: guarded against non-finite
    values (nonfinite.py), advancing the position, jitted on the mesh."""
    parts = step_parts(config)
    skip = config.nonfinite == "skip"
    return {
        kind: parallel.jit_train_step(
            advancing(nonfinite.guard(make_step(kind, parts), skip)), mesh
        )
        for kind in kinds
    }


@dataclasses.dataclass(frozen=True)
class Method:
    """A method's phases: `first` for N1 steps, then `per_generation` in each generation."""

    about: str  # One line for the docs and the config's help.
    first: str  # Phase kind of the first schedule.joint_steps steps.
    per_generation: tuple[tuple[str, str], ...]  # (phase kind, schedule field of its length).
    reads_source: bool = True  # Whether it ever reads a source image.
    source_without_harm: bool = False  # Its source labels ignore the known harmful pixels.


METHODS: dict[str, Method] = {
    "target_only": Method(
        "the labeled target images alone",
        "target",
        (("target", "weighted_steps"),),
        reads_source=False,
    ),
    "direct_joint": Method(
        "source and target jointly, unweighted", "joint", (("joint", "weighted_steps"),)
    ),
    "oracle_mask": Method(
        "direct joint with the benchmark's harmful source pixels left out: the bound of "
        "pixel weighting (embedded benchmark only)",
        "joint",
        (("joint", "weighted_steps"),),
        source_without_harm=True,
    ),
    "finetune": Method(
        "joint, then unweighted steps with the weighted phases' optimiser (Table 1)",
        "joint",
        (("finetune", "weighted_steps"),),
    ),
    "fda": Method(
        "joint on source images restyled by FDA (Tables 1-2, '+ sup')",
        "fda",
        (("fda", "weighted_steps"),),
    ),
    "minent": Method(
        "joint + the entropy of the target predictions (Tables 1-2, '+ sup')",
        "minent",
        (("minent", "weighted_steps"),),
    ),
    "hrselect": Method(
        "MetaPix with the U-Net trained by HRSelect's L2 heuristic (Table 1)",
        "joint",
        (("hrselect", "meta_steps"), ("weighted", "weighted_steps")),
    ),
    "metapix": Method(
        "Algorithm 1: joint, then per generation meta (Alg. 2) and weighted (Alg. 3) phases",
        "joint",
        (("meta", "meta_steps"), ("weighted", "weighted_steps")),
    ),
    "metapix_online": Method(
        "joint, then per position one meta step and one weighted step on the same batch",
        "joint",
        (("online", "weighted_steps"),),
    ),
}

# Compare-mode names that are a method plus config fields: (method, {field: value}).
VARIANTS: dict[str, tuple[str, dict]] = {
    "focal": ("direct_joint", {"loss.kind": "focal"}),
    "metapix_w19": ("metapix", {"weighting.kind": "w19"}),
    "metapix_k1": ("metapix", {"model.split_block": 1}),
    "metapix_adam": ("metapix", {"meta.inner_optimizer": "adam"}),
    "hrselect_w19": ("hrselect", {"weighting.kind": "w19"}),
    "metapix_norm": ("metapix", {"weighting.normalization": "batch"}),
    "metapix_classnorm": ("metapix", {"weighting.normalization": "class"}),
}


def resolve(name: str) -> tuple[str, dict]:
    """(method, field overrides) of a compare_methods entry; an unknown name is an error."""
    if name in METHODS:
        return name, {}
    if name in VARIANTS:
        return VARIANTS[name]
    raise ValueError(
        f"compare_methods: unknown method {name!r}; use one of {tuple(METHODS)} "
        f"or a variant {tuple(VARIANTS)}"
    )


def reads_source(config: ml_collections.ConfigDict) -> bool:
    """Whether the configured method ever reads a source image."""
    return METHODS[config.method].reads_source


def method_learns_weights(name: str) -> bool:
    """Whether the method of that name trains the U-Net (its weights are worth measuring)."""
    m = METHODS[name]
    kinds = [m.first, *(kind for kind, _ in m.per_generation)]
    return any(PHASE_KINDS[kind].learns_weights for kind in kinds)


def learns_weights(config: ml_collections.ConfigDict) -> bool:
    """Whether the configured method trains the U-Net (its weights are worth measuring)."""
    return method_learns_weights(config.method)
