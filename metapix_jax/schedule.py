"""Algorithm 1 as data: the phases of each method, laid end to end on one position axis.

MetaPix: N1 joint steps, then G generations of N2 meta steps and N3 weighted steps.
The baselines take as many segmenter steps as MetaPix (N1 + G * N3), in phases of the
same lengths, so every method is checkpointed and evaluated at comparable points.

Methods (phase kinds; a kind names its step function in steps.Steps):
- metapix: joint N1, then per generation meta N2 + weighted N3 (Algorithm 1).
- metapix_online: joint N1, then per generation N3 'online' positions, each a meta step
  and a weighted step on the same batch (meta.online_step).
- hrselect: like metapix with the meta phase replaced by the heuristic (hrselect.py).
- finetune: joint N1, then per generation N3 unweighted 'finetune' steps with the
  weighted phases' optimiser (Table 3, "FCN+finetune"). It differs from direct_joint
  only when optim.fresh_weighted_optimizer is set; otherwise it is the same run.
- direct_joint, target_only: joint / target-only steps throughout.
- fda, minent: joint training with FDA-restyled source images, or with the entropy of
  the target predictions added (the "+ sup" baselines of Tables 1-2).
Focal loss is not a method but loss.kind = 'focal' (compare mode's 'focal' sets it).
"""

import dataclasses

import ml_collections

METHODS = (
    "metapix",
    "direct_joint",
    "target_only",
    "finetune",
    "metapix_online",
    "hrselect",
    "fda",
    "minent",
)
# The phase kind of the pre-training phase (and of every phase, for one-kind methods).
FIRST_KIND = {"target_only": "target", "fda": "fda", "minent": "minent"}
# Per generation: (phase kind, schedule field giving its length).
GENERATION_KINDS = {
    "metapix": (("meta", "meta_steps"), ("weighted", "weighted_steps")),
    "hrselect": (("hrselect", "meta_steps"), ("weighted", "weighted_steps")),
    "metapix_online": (("online", "weighted_steps"),),
    "finetune": (("finetune", "weighted_steps"),),
}
# Kinds that train the U-Net (a fresh one per generation if meta.reinit_per_generation).
WEIGHT_LEARNING_KINDS = ("meta", "online", "hrselect")
# Kinds whose segmenter optimiser is the weighted phases' (optim.fresh_weighted_optimizer).
WEIGHTED_OPTIMIZER_KINDS = ("weighted", "online", "finetune")
# Kinds during which the U-Net's weights mean something (shown in TensorBoard).
WEIGHT_KINDS = ("meta", "weighted", "online", "hrselect")


# Compare-mode names that are a method plus config fields: (method, {field: value}).
VARIANTS = {
    "focal": ("direct_joint", {"loss.kind": "focal"}),
    "metapix_w19": ("metapix", {"weighting.kind": "w19"}),
    "metapix_k1": ("metapix", {"model.split_block": 1}),
    "metapix_adam": ("metapix", {"meta.inner_optimizer": "adam"}),
    "hrselect_w19": ("hrselect", {"weighting.kind": "w19"}),
}


def resolve(name: str) -> tuple[str, dict]:
    """(method, field overrides) of a compare_methods entry; an unknown name is an error."""
    if name in METHODS:
        return name, {}
    if name in VARIANTS:
        return VARIANTS[name]
    raise ValueError(
        f"compare_methods: unknown method {name!r}; use one of {METHODS} "
        f"or a variant {tuple(VARIANTS)}"
    )


@dataclasses.dataclass(frozen=True)
class Phase:
    """`length` steps of one kind, starting at schedule position `start`."""

    kind: str  # 'joint', 'target', 'meta' or 'weighted': the step function it runs.
    generation: int  # 0 for the pre-training phase, 1..G after it.
    start: int
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def name(self) -> str:
        return self.kind if self.generation == 0 else f"{self.kind}_gen{self.generation}"


def phases(config: ml_collections.ConfigDict) -> list[Phase]:
    """The method's phases in order (empty phases are dropped)."""
    s = config.schedule
    if config.method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {config.method!r}")
    first = FIRST_KIND.get(config.method, "joint")
    per_generation = GENERATION_KINDS.get(config.method, ((first, "weighted_steps"),))
    kinds = [(first, 0, s.joint_steps)]
    for generation in range(1, s.generations + 1):
        kinds += [(kind, generation, s[field]) for kind, field in per_generation]
    out, start = [], 0
    for kind, generation, length in kinds:
        if length > 0:
            out.append(Phase(kind, generation, start, length))
            start += length
    return out


def total_positions(config: ml_collections.ConfigDict) -> int:
    """Steps of every kind in the whole schedule."""
    return sum(p.length for p in phases(config))


def needs_source(config: ml_collections.ConfigDict) -> bool:
    """Only target-only training never reads a source image."""
    return config.method != "target_only"
