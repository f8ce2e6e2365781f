"""Rank policies: how many singular values each layer keeps.

One parser, `parse_rank`, turns what a user writes into a policy:
    288          a fixed rank on every layer (clipped to nothing: too large raises)
    0.375        a fraction of min(out, in), rounded, at least 1; 1.0 is full rank. Other integral floats (2.0)
                 are refused: a rank is an int, and a float means a fraction
    'energy:0.9' the smallest rank whose cumulative energy reaches 0.9, per layer
    'ght'        Gavish and Donoho's optimal hard threshold, per layer
    'budget:1.0' per-layer ranks chosen together under a parameter budget (`allocate_budget`; a float is a multiple
                 of what the uniform rank 0.375 spends, an int a parameter count): a model-level policy,
                 resolved by `allocate_ranks`
A mapping {module name or pattern: any of the above} gives each layer its own (a rank pattern, as PEFT's).

`allocate_budget` is the allocation itself, on gains and costs alone; `allocate_spectra` runs it on layers'
spectra, and `allocate_ranks` on a model's targeted weights (or, activation-aware, their whitened spectra). A rank
travelling from `apply_tou` only ever comes down here: this module never imports the methods.
"""
import heapq
import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .calibration import layer_whitening
from .linalg import check_rank, rank_for_energy, singular_values_many
from .targets import Targets, layer_matrices, matches

__all__ = ['RankPolicy', 'parse_rank', 'allocate_budget', 'allocate_spectra', 'allocate_ranks', 'uniform_cost',
           'layer_policies', 'rank_from_fraction', 'optimal_hard_threshold_rank', 'ght_omega', 'DEFAULT_FRACTION',
           'BUDGET_POLICIES']

DEFAULT_FRACTION = 0.375  # the paper's r = 288 on ViT-B/16's 768-wide matrices, as a fraction of min(out, in)
# the rank study's policies, compared at equal budgets (`toukit.studies.budget_policies`), in the order tables show them
BUDGET_POLICIES = ('uniform', 'energy threshold', 'budget (weights)', 'budget (activations)')

RankSpec = Union[int, float, str, 'RankPolicy', Mapping[str, Union[int, float, str]]]


def rank_from_fraction(fraction: float, max_rank: int) -> int:
    """The rank a fraction of min(out, in) (`max_rank`) gives: rounded, at least 1, at most `max_rank`."""
    return max(1, min(max_rank, int(round(fraction * max_rank))))


@dataclass(frozen=True)
class RankPolicy:
    """A rule mapping a layer (its shape and, for energy, its singular values) to a rank."""
    kind: str  # 'fixed', 'fraction', 'energy', 'ght' or 'budget'
    value: float = 0.0

    def __post_init__(self):
        if self.kind == 'fixed':
            if isinstance(self.value, bool) or not isinstance(self.value, int):
                raise ValueError(f'rank={self.value!r}: a fixed rank must be an int')
            # the range [1, min(out, in)] is checked per layer by resolve(), so the message names the layer
        elif self.kind == 'fraction':
            if not 0 < self.value <= 1:
                raise ValueError(f'rank fraction={self.value!r}: must be in (0, 1] (1.0: full rank)')
        elif self.kind == 'energy':
            if not 0 < self.value <= 1:
                raise ValueError(f'energy threshold={self.value!r}: must be in (0, 1]')
        elif self.kind == 'budget':
            if isinstance(self.value, bool) or not isinstance(self.value, (int, float)) or not self.value > 0:
                raise ValueError(f'budget={self.value!r}: must be a positive int (parameters) or float (a multiple '
                                 f'of the uniform-rank cost)')
        elif self.kind != 'ght':
            raise ValueError(f"rank policy kind={self.kind!r}: must be 'fixed', 'fraction', 'energy', 'ght' or "
                             f"'budget'")

    @property
    def needs_spectrum(self) -> bool:
        return self.kind in ('energy', 'ght')

    @property
    def model_level(self) -> bool:
        """Whether the policy chooses all layers' ranks together (resolved by `allocate_ranks`)."""
        return self.kind == 'budget'

    def resolve(self, shape: Tuple[int, int], singular_values: Optional[torch.Tensor] = None, name: str = 'weight'):
        """The rank this policy gives a layer of `shape` (out, in); energy policies need its singular values."""
        if self.kind == 'fixed':
            return check_rank(int(self.value), shape, name)
        if self.kind == 'fraction':
            return rank_from_fraction(self.value, min(shape))
        if self.model_level:
            raise ValueError(f'{self} chooses all layers together: use toukit.allocate_ranks')
        if singular_values is None:
            raise ValueError(f'{self} needs the singular values of {name}')
        if self.kind == 'ght':
            return optimal_hard_threshold_rank(singular_values, shape)
        return rank_for_energy(singular_values, self.value)

    def __str__(self):
        # repr of a float is the shortest text that reads back as the same float: no threshold is rounded
        return {'fixed': '{:d}', 'fraction': '{!r}', 'energy': 'energy:{!r}', 'ght': 'ght',
                'budget': 'budget:{!r}'}[self.kind].format(self.value)


def parse_rank(spec: RankSpec) -> RankPolicy:
    """Parse an int (fixed rank), a float in (0, 1] (fraction of min(out, in); 1.0 is full rank), 'energy:T',
    'ght' or 'budget:B' into a RankPolicy (see the module's docstring)."""
    if isinstance(spec, RankPolicy):
        return spec
    if isinstance(spec, bool):
        raise ValueError(f'rank={spec!r}: expected an int, a float in (0, 1], "energy:T", "ght" or "budget:B"')
    if isinstance(spec, int):
        return RankPolicy('fixed', spec)
    if isinstance(spec, float):
        if spec.is_integer() and spec > 1:
            raise ValueError(f'rank={spec!r}: a float is a fraction of min(out, in) in (0, 1] (1.0: full rank); '
                             f'pass an int for a fixed rank')
        return RankPolicy('fraction', spec)
    if isinstance(spec, str):
        text = spec.strip()
        if text == 'ght':
            return RankPolicy('ght')
        if text.startswith('budget:'):
            value = text.split(':', 1)[1].strip()
            try:
                number = float(value)
            except ValueError:
                raise ValueError(f'rank={spec!r}: budget is not a number') from None
            # 'budget:3000' is a parameter count, 'budget:1.0' a multiple of the uniform-rank cost
            is_count = number.is_integer() and '.' not in value and 'e' not in value.lower()
            return RankPolicy('budget', int(number) if is_count else number)
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
            raise ValueError(f'rank={spec!r}: expected an int, a float in (0, 1], "energy:T", "ght" or '
                             f'"budget:B"') from None
        return parse_rank(int(number) if number.is_integer() and '.' not in text and 'e' not in text.lower()
                          else number)
    raise ValueError(f'rank={spec!r}: expected an int, a float in (0, 1], "energy:T", "ght" or "budget:B"')


def allocate_budget(gains: Sequence[torch.Tensor], costs: Sequence[float], budget: float) -> List[int]:
    """Per-layer ranks that maximise the summed gain under a cost budget, every layer at rank 1 at least.

    Args:
        gains: per layer, the error each further rank removes, non-increasing (e.g. sigma_i^2 / ||W||_F^2 for
            i = 1, 2, ...; entry 0 is the first rank's, which every layer gets).
        costs: per layer, the parameters one rank costs (constant per layer).
        budget: the parameters to spend.

    Greedy by gain per parameter (water-filling on the singular values): it adds the rank with the largest
    gain/cost while it fits and stops at the first that does not, so it spends within one rank step of the budget.
    Every prefix of this order is exactly optimal for its own cost (it maximises gain - lambda * cost for the last
    ratio lambda, and no allocation of lower or equal cost beats that), which `tests/test_ranks.py` checks
    against brute force.

    Raises:
        ValueError: a budget below what rank 1 everywhere costs.
    """
    if len(gains) != len(costs) or not gains:
        raise ValueError(f'allocate_budget: {len(gains)} layers of gains and {len(costs)} costs')
    floor = float(sum(costs))
    if not budget >= floor:
        raise ValueError(f'budget={budget!r} is below the smallest possible allocation ({floor:.0f} parameters: rank 1 '
                         f'on each of the {len(costs)} layers)')
    ranks = [1] * len(gains)
    spent = floor
    heap = [(-float(g[1]) / c, i) for i, (g, c) in enumerate(zip(gains, costs)) if len(g) > 1]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        if spent + costs[i] > budget:
            break
        ranks[i] += 1
        spent += costs[i]
        if ranks[i] < len(gains[i]):
            heapq.heappush(heap, (-float(gains[i][ranks[i]]) / costs[i], i))
    return ranks


def layer_policies(rank: RankSpec, names) -> Dict[str, RankPolicy]:
    """Name -> rank policy for each of `names`, from one rank spec or a rank pattern {name or pattern: spec}.

    In a pattern, a layer takes the first key that is its full name, a suffix of it, or a glob matching it; '*'
    matches every layer no other key does.

    Raises:
        ValueError: a key that matches no layer, or a layer no key matches (and no '*').
    """
    names = list(names)
    if not isinstance(rank, Mapping):
        policy = parse_rank(rank)
        return {n: policy for n in names}
    if not rank:
        raise ValueError('rank={}: an empty rank pattern')
    policies = {k: parse_rank(v) for k, v in rank.items()}
    model_level = [k for k, p in policies.items() if p.model_level]
    if model_level:
        raise ValueError(f'rank pattern {model_level[0]!r}: {policies[model_level[0]]} chooses all layers together; '
                         f'pass it alone')
    out, used = {}, set()
    for name in names:
        key = next((k for k in rank if k != '*' and matches(name, k)), '*' if '*' in rank else None)
        if key is None:
            raise ValueError(f'rank pattern {list(rank)} gives no rank to {name}: add its name or a "*" key')
        out[name] = policies[key]
        used.add(key)
    unused = [k for k in rank if k not in used and k != '*']
    if unused:
        raise ValueError(f'rank pattern keys {unused} name no targeted module; targets are: '
                         f'{", ".join(names[:12])}{" ..." if len(names) > 12 else ""}')
    return out


LayerSpectra = Tuple[str, Sequence[torch.Tensor], Sequence[Tuple[int, int]]]  # name, its matrices' spectra, shapes


def _rank_cost(shapes: Sequence[Tuple[int, int]], cost: str) -> int:
    """Parameters one rank of a layer costs: `in` per matrix (B's row), plus `out` (A's column) with cost='total'."""
    return int(sum(i + (o if cost == 'total' else 0) for o, i in shapes))


def uniform_cost(layers: Sequence[LayerSpectra], cost: str = 'trainable') -> int:
    """What uniform rank 0.375 of min(out, in) spends on `layers`: the unit of a budget given as a float."""
    return sum(rank_from_fraction(DEFAULT_FRACTION, min(min(shape) for shape in shapes)) * _rank_cost(shapes, cost)
               for _, _, shapes in layers)


def allocate_spectra(layers: Sequence[LayerSpectra], budget, cost: str = 'trainable') -> Dict[str, int]:
    """Per-layer ranks minimising the summed relative squared truncation error under a parameter budget.

    A layer of several matrices (a fused q/k/v) shares one rank: its rank step removes their k-th singular values at
    once and costs as many times. See `allocate_ranks`; this is the same on given spectra.
    """
    if cost not in ('trainable', 'total'):
        raise ValueError(f"cost={cost!r}: must be 'trainable' or 'total'")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
        raise ValueError(f'budget={budget!r}: must be a positive int (parameters) or float (a multiple of the '
                         f'uniform-rank cost)')
    gains, costs = [], []
    for _, spectra, shapes in layers:
        energies = [torch.as_tensor(s, dtype=torch.float64).square() for s in spectra]
        length = min(len(e) for e in energies)
        gains.append(sum(e[:length] for e in energies) / sum(float(e.sum()) for e in energies))
        costs.append(_rank_cost(shapes, cost))
    spend = budget * uniform_cost(layers, cost) if isinstance(budget, float) else budget
    return dict(zip([name for name, _, _ in layers], allocate_budget(gains, costs, spend)))


def allocate_ranks(model: nn.Module, budget, targets: Targets = 'all', cost: str = 'trainable',
                   objective: str = 'weight', calibration=None, chunk: Optional[int] = None) -> Dict[str, int]:
    """Per-layer TOU ranks that minimise the summed relative squared truncation error under a parameter budget.

    Each targeted layer's error at rank r is ||W - W_r||_F^2 / ||W||_F^2 (objective 'weight'), or the same for
    W L with L the whitening factor of its inputs (objective 'activation': the error of the layer's outputs on
    the calibration inputs). Relative, so that every layer counts alike whatever its scale: with absolute errors
    the few layers of largest norm would take the whole budget. A fused q/k/v projection is one layer of three
    matrices sharing one rank (as `FactorizedLinear` holds it): its rank step removes the three matrices' k-th
    singular values at once and costs three times.

    Args:
        model: the untouched model.
        budget: parameters to spend (int), or a multiple of what uniform rank 0.375 of min(out, in) spends
            (float; 1.0 spends the same).
        targets: as `apply_tou`.
        cost: 'trainable' (a rank costs `in` per matrix: B's row) or 'total' (`in + out`: A's column too).
        objective: 'weight' or 'activation' (needs `calibration`).
        calibration: model inputs, or layer name -> inputs (see `toukit.calibration.layer_whitening`).
        chunk: at most this many same-shape matrices in float64 at once (see `toukit.apply_tou`); None: a shape's.

    Returns:
        Layer name -> rank, in the model's order; `apply_tou(model, rank=...)` takes it as a rank pattern.
    """
    if objective not in ('weight', 'activation'):
        raise ValueError(f"objective={objective!r}: must be 'weight' or 'activation'")
    if objective == 'activation' and calibration is None:
        raise ValueError("objective='activation' needs calibration inputs")
    if cost not in ('trainable', 'total'):
        raise ValueError(f"cost={cost!r}: must be 'trainable' or 'total'")
    entries = list(layer_matrices(model, targets))
    factors = layer_whitening(model, calibration, targets) if objective == 'activation' else {}
    spectra = singular_values_many([w for _, _, w in entries], chunk=chunk,
                                   whitening=[factors.get(name) for name, _, _ in entries] if factors else None)
    layers = {}
    for (name, _, w), s in zip(entries, spectra):
        layers.setdefault(name, ([], []))
        layers[name][0].append(s)
        layers[name][1].append(tuple(w.shape))
    return allocate_spectra([(name, sv, shapes) for name, (sv, shapes) in layers.items()], budget, cost)


# ---------------------------------------------------------------------------------------------------------------
# the optimal hard threshold (Gavish and Donoho)

_GHT_OMEGA_CACHE: dict = {}  # omega per beta rounded to 12 decimals; one entry per distinct layer aspect ratio


def _check_beta(beta: float) -> float:
    """`beta` as a float if it is a number in (0, 1], else a ValueError naming it."""
    try:
        value = float(beta)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(beta, (bool, str, bytes)) or not 0.0 < value <= 1.0:
        raise ValueError(f'beta={beta!r}: the aspect ratio min(shape) / max(shape) must be a number in (0, 1]')
    return value


def _check_shape(shape: Tuple[int, int]) -> Tuple[int, int]:
    """`shape` as (rows, cols) if it is two positive ints, else a ValueError naming it."""
    try:
        dims = tuple(shape)
    except TypeError:
        dims = ()
    if len(dims) != 2 or any(isinstance(d, bool) or not hasattr(d, '__index__') or d.__index__() < 1 for d in dims):
        raise ValueError(f'shape={shape!r}: must be two positive ints (rows, cols), e.g. a weight\'s (out, in)')
    return dims[0].__index__(), dims[1].__index__()


def _marchenko_pastur_median(beta: float) -> float:
    """Median of the Marchenko-Pastur law of ratio `beta` in (0, 1] (variance 1), found with scipy.

    With x = 1 + beta - 2 sqrt(beta) cos(t), t in [0, pi], the density sqrt((b+ - x)(x - b-)) / (2 pi beta x) dx
    becomes 2 sin(t)^2 / (pi x(t)) dt: smooth and bounded even at beta = 1, where the density itself has a
    1 / sqrt(x) singularity at 0. The median is x(t*) for the t* where that integral from 0 reaches 1/2.
    """
    from scipy.integrate import quad  # imported here: only this policy needs scipy, which costs ~0.3 s at import
    from scipy.optimize import brentq

    root = math.sqrt(beta)

    def cdf(t: float) -> float:
        return quad(lambda u: 2.0 * math.sin(u) ** 2 / (math.pi * (1.0 + beta - 2.0 * root * math.cos(u))), 0.0, t,
                    epsabs=1e-13, epsrel=1e-12)[0]

    t_half = brentq(lambda t: cdf(t) - 0.5, 0.0, math.pi, xtol=1e-14, rtol=1e-13)
    return 1.0 + beta - 2.0 * root * math.cos(t_half)


def ght_omega(beta: float) -> float:
    """Gavish and Donoho's exact omega(beta) for an unknown noise level: the threshold is omega(beta) * median(sigma).

    omega(beta) = lambda*(beta) / sqrt(mu_beta), with lambda*(beta) = sqrt(2 (beta + 1) + 8 beta / ((beta + 1) +
    sqrt(beta^2 + 14 beta + 1))) and mu_beta the median of the Marchenko-Pastur distribution of ratio beta (density
    sqrt((b+ - x)(x - b-)) / (2 pi beta x) on [b-, b+], b+- = (1 +- sqrt(beta))^2), computed with scipy's quad and
    brentq and cached per beta (rounded to 12 decimals). omega(1) = 2.858; their cubic fit 0.56 beta^3 - 0.95 beta^2
    + 1.82 beta + 1.43 is within about 0.02 of it.

    Args:
        beta: The aspect ratio min(m, n) / max(m, n) of the matrix, in (0, 1].

    Returns:
        omega(beta), a float.

    Raises:
        ValueError: If `beta` is not a number in (0, 1].
    """
    beta = round(_check_beta(beta), 12)
    omega = _GHT_OMEGA_CACHE.get(beta)
    if omega is None:
        lam = math.sqrt(2.0 * (beta + 1.0) + 8.0 * beta / (beta + 1.0 + math.sqrt(beta ** 2 + 14.0 * beta + 1.0)))
        omega = _GHT_OMEGA_CACHE[beta] = lam / math.sqrt(_marchenko_pastur_median(beta))
    return omega


def optimal_hard_threshold_rank(singular_values: torch.Tensor, shape: Tuple[int, int]) -> int:
    """Rank by Gavish and Donoho's optimal hard threshold for an unknown noise level (exact, not the cubic fit).

    From "The Optimal Hard Threshold for Singular Values is 4/sqrt(3)" (IEEE Trans. Inf. Theory 60(8), 2014): keep
    the singular values strictly above tau = omega(beta) * y_med, where beta = min(shape) / max(shape), y_med is
    the median of the singular values (the mean of the two middle ones for an even count, as MATLAB's `median`)
    and omega(beta) = lambda*(beta) / sqrt(mu_beta) is `ght_omega`.

    Args:
        singular_values: The matrix's singular values (1-D, any order), normally all min(shape) of them: the median
            estimates the noise level from the bulk.
        shape: The matrix's (out, in) shape: two positive ints.

    Returns:
        The number of singular values above tau, at least 1.

    Raises:
        ValueError: If `shape` is not two positive ints, or `singular_values` is not a non-empty 1-D tensor.
    """
    rows, cols = _check_shape(shape)
    s = torch.as_tensor(singular_values).detach().to('cpu', torch.float64)
    if s.ndim != 1 or s.numel() == 0:
        raise ValueError(f'singular_values of shape {tuple(s.shape)}: must be a non-empty 1-D tensor')
    ordered, n = s.sort().values, s.numel()
    y_med = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    tau = ght_omega(min(rows, cols) / max(rows, cols)) * y_med
    return max(1, int((s > tau).sum()))
