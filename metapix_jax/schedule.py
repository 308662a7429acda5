"""Algorithm 1 as data: the phases of each method, laid end to end on one position axis.

MetaPix: N1 joint steps, then G generations of N2 meta steps and N3 weighted steps.
The baselines take as many segmenter steps as MetaPix (N1 + G * N3), in phases of the
same lengths, so every method is checkpointed and evaluated at comparable points.
"""

import dataclasses

import ml_collections

METHODS = ("metapix", "direct_joint", "target_only")


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
    first = "target" if config.method == "target_only" else "joint"
    kinds = [(first, 0, s.joint_steps)]
    for generation in range(1, s.generations + 1):
        if config.method == "metapix":
            kinds += [
                ("meta", generation, s.meta_steps),
                ("weighted", generation, s.weighted_steps),
            ]
        else:
            kinds.append((first, generation, s.weighted_steps))
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
