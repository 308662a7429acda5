"""Algorithm 1 as data: a method's phases laid end to end on one position axis.

A position counts steps of every kind. The method table (methods.py) says which phase
kinds a method runs; this module gives each phase its start and length from the
config's schedule fields (N1 = joint_steps, then G = generations of the per-generation
phases), so the training loop is a loop over phases and resuming at any position is a
matter of finding its phase.
"""

import dataclasses

import ml_collections

from metapix_jax import methods


@dataclasses.dataclass(frozen=True)
class Phase:
    """`length` steps of one kind (a key of methods.PHASE_KINDS), from position `start`."""

    kind: str
    generation: int  # 0 for the first phase, 1..G after it.
    start: int
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def name(self) -> str:
        return self.kind if self.generation == 0 else f"{self.kind}_gen{self.generation}"

    @property
    def spec(self) -> methods.PhaseKind:
        """What this kind of phase does (its step and flags)."""
        return methods.PHASE_KINDS[self.kind]


def phases(config: ml_collections.ConfigDict) -> list[Phase]:
    """The configured method's phases in order; empty ones are dropped."""
    if config.method not in methods.METHODS:
        raise ValueError(f"method must be one of {tuple(methods.METHODS)}, got {config.method!r}")
    method, s = methods.METHODS[config.method], config.schedule
    kinds = [(method.first, 0, s.joint_steps)]
    for generation in range(1, s.generations + 1):
        kinds += [(kind, generation, s[field]) for kind, field in method.per_generation]
    out, start = [], 0
    for kind, generation, length in kinds:
        if length > 0:
            out.append(Phase(kind, generation, start, length))
            start += length
    return out


def total_positions(config: ml_collections.ConfigDict) -> int:
    """Steps of every kind in the whole schedule."""
    return sum(p.length for p in phases(config))
