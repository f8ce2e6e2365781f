"""Rank policies: how many singular values each layer keeps.

One parser, `parse_rank`, turns what a user writes into a policy:
    288          a fixed rank on every layer (clipped to nothing: too large raises)
    0.375        a fraction of min(out, in), rounded, at least 1
    'energy:0.9' the smallest rank whose cumulative energy reaches 0.9, per layer
"""
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

from .linalg import check_rank, rank_for_energy

__all__ = ['RankPolicy', 'parse_rank']

RankSpec = Union[int, float, str, 'RankPolicy']


@dataclass(frozen=True)
class RankPolicy:
    """A rule mapping a layer (its shape and, for energy, its singular values) to a rank."""
    kind: str  # 'fixed', 'fraction' or 'energy'
    value: float

    def __post_init__(self):
        if self.kind == 'fixed':
            if isinstance(self.value, bool) or not isinstance(self.value, int):
                raise ValueError(f'rank={self.value!r}: a fixed rank must be an int')
            # the range [1, min(out, in)] is checked per layer by resolve(), so the message names the layer
        elif self.kind == 'fraction':
            if not 0 < self.value < 1:
                raise ValueError(f'rank fraction={self.value!r}: must be in (0, 1)')
        elif self.kind == 'energy':
            if not 0 < self.value <= 1:
                raise ValueError(f'energy threshold={self.value!r}: must be in (0, 1]')
        else:
            raise ValueError(f"rank policy kind={self.kind!r}: must be 'fixed', 'fraction' or 'energy'")

    @property
    def needs_spectrum(self) -> bool:
        return self.kind == 'energy'

    def resolve(self, shape: Tuple[int, int], singular_values: Optional[torch.Tensor] = None, name: str = 'weight'):
        """The rank this policy gives a layer of `shape` (out, in); energy policies need its singular values."""
        if self.kind == 'fixed':
            return check_rank(int(self.value), shape, name)
        if self.kind == 'fraction':
            return max(1, int(round(self.value * min(shape))))
        if singular_values is None:
            raise ValueError(f'{self} needs the singular values of {name}')
        return rank_for_energy(singular_values, self.value)

    def __str__(self):
        # repr of a float is the shortest text that reads back as the same float: no threshold is rounded
        return {'fixed': '{:d}', 'fraction': '{!r}', 'energy': 'energy:{!r}'}[self.kind].format(self.value)


def parse_rank(spec: RankSpec) -> RankPolicy:
    """Parse an int (fixed rank), a float in (0, 1) (fraction of min(out, in)) or 'energy:T' into a RankPolicy."""
    if isinstance(spec, RankPolicy):
        return spec
    if isinstance(spec, bool):
        raise ValueError(f'rank={spec!r}: expected an int, a float in (0, 1) or "energy:T"')
    if isinstance(spec, int):
        return RankPolicy('fixed', spec)
    if isinstance(spec, float):
        if spec.is_integer() and spec >= 1:
            return RankPolicy('fixed', int(spec))
        return RankPolicy('fraction', spec)
    if isinstance(spec, str):
        text = spec.strip()
        if text.startswith('energy:'):
            try:
                return RankPolicy('energy', float(text.split(':', 1)[1]))
            except ValueError as e:
                if 'must be' in str(e):
                    raise
                raise ValueError(f'rank={spec!r}: energy threshold is not a number') from None
        try:
            number = float(text)
        except ValueError:
            raise ValueError(f'rank={spec!r}: expected an int, a float in (0, 1) or "energy:T"') from None
        return parse_rank(int(number) if number.is_integer() and number >= 1 else number)
    raise ValueError(f'rank={spec!r}: expected an int, a float in (0, 1) or "energy:T"')
