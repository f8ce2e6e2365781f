"""Pure tensor math of truncated SVD: spectra, energy, ranks and truncation error (the optimal hard threshold's
rank is with the rank policies, `toukit.ranks`).

Every function takes tensors and returns tensors or numbers; nothing here knows about modules or files.
Spectral quantities are computed in float64 so that energy sums over hundreds of singular values stay exact.
"""
import math
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    'singular_values', 'singular_values_many', 'truncated_svd', 'svd_many', 'energy_curve', 'rank_for_energy',
    'stable_rank', 'effective_rank', 'relative_error', 'check_finite', 'check_rank', 'whitening_factor', 'factorize',
    'factorize_iter', 'unwhiten', 'balance_factors',
]


def check_finite(weight: torch.Tensor, name: str = 'weight') -> None:
    """Raise ValueError if `weight` holds NaN or Inf, naming `name`."""
    if not torch.isfinite(weight).all():
        bad = (~torch.isfinite(weight)).sum().item()
        raise ValueError(f'{name} has {bad} non-finite values (NaN or Inf); refusing to factorize or merge it')


def check_rank(rank: int, shape: Tuple[int, int], name: str = 'weight') -> int:
    """Return `rank` if 1 <= rank <= min(shape), else raise ValueError naming `name` and the value."""
    max_rank = min(shape)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= max_rank:
        raise ValueError(f'rank={rank!r} for {name} of shape {tuple(shape)}: must be an int in [1, {max_rank}]')
    return rank


def singular_values(weight: torch.Tensor) -> torch.Tensor:
    """Singular values of a matrix (or a batch of matrices), descending, in float64 on the CPU."""
    return torch.linalg.svdvals(weight.detach().to('cpu', torch.float64))


def _svd(work: torch.Tensor, rank: Optional[int], method: str, niter: int, seed: Optional[int]):
    """(U, S, Vh) of `work` (batched), truncated to `rank`; the randomized method needs a rank."""
    if method == 'exact':
        u, s, vh = torch.linalg.svd(work, full_matrices=False)
    elif method == 'gram':
        u, s, vh = _gram_svd(work, rank)
    elif method == 'randomized':
        if rank is None:
            raise ValueError("method='randomized' needs a rank (energy thresholds need the exact spectrum)")
        # svd_lowrank takes no generator: seed it inside a forked RNG so the caller's random stream is untouched
        with torch.random.fork_rng(devices=[work.device] if work.device.type == 'cuda' else []):
            if seed is not None:
                torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(work, q=min(rank + 8, min(work.shape[-2:])), niter=niter)
        vh = v.mT
    else:
        raise ValueError(f"svd method={method!r}: must be 'exact', 'gram' or 'randomized'")
    if rank is not None:
        u, s, vh = u[..., :rank], s[..., :rank], vh[..., :rank, :]
    return u, s, vh


def _gram_svd(work: torch.Tensor, rank: Optional[int] = None):
    """SVD through the symmetric eigenproblem of the smaller Gram matrix, in the input's precision.

    For W (m x n) with n <= m: W^T W = V S^2 V^T, U S = W V. A batched `eigh` of an n x n matrix costs a fraction
    of a general SVD. Squaring W squares its condition number, so singular values below about sqrt(eps) of the
    largest (3e-4 in float32) lose their relative accuracy and their vectors mix; the product U_r S_r V_r^T of
    the leading triplets stays accurate (`benchmarks/bench.py factorize` measures it against the exact SVD),
    and vectors of (near-)zero singular values are not reliable. Pass float64 for spectra. With `rank`, only the
    leading `rank` vectors are formed (all singular values are returned).
    """
    tall = work.shape[-2] >= work.shape[-1]
    g = work.mT @ work if tall else work @ work.mT
    evals, evecs = torch.linalg.eigh(g)  # ascending
    del g
    s = evals.flip(-1).clamp_min(0).sqrt()
    k = s.shape[-1] if rank is None else rank
    vecs = evecs[..., -k:].flip(-1)
    del evecs
    safe = torch.where(s[..., :k] > s[..., :1] * 1e-12, s[..., :k], torch.ones_like(s[..., :k]))
    if tall:
        return (work @ vecs).div_(safe.unsqueeze(-2)), s, vecs.mT
    return vecs, s, (vecs.mT @ work).div_(safe.unsqueeze(-1))


def _work_dtype(w: torch.Tensor) -> torch.Tensor:
    return w.detach().float() if w.dtype in (torch.float16, torch.bfloat16) else w.detach()


def truncated_svd(
        weight: torch.Tensor,
        rank: int,
        method: str = 'exact',
        niter: int = 4,
        seed: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Factor W (out x in, or a batch ... x out x in) into A = U_r S_r (out x r) and B = V_r^T (r x in).

    Args:
        weight: the matrix W, or a stack of same-shape matrices (the SVD is batched).
        rank: r, kept singular values; 1 <= r <= min(out, in).
        method: 'exact' (`torch.linalg.svd`), 'gram' (eigh of the Gram matrix: several times faster on CPUs,
            accurate for the kept triplets) or 'randomized' (`torch.svd_lowrank`, Halko et al.).
        niter: subspace iterations of the randomized method.
        seed: seeds the randomized method's sketch.

    Returns:
        (A, B) in the dtype of `weight`, with A @ B the best rank-r approximation of W.
    """
    check_rank(rank, weight.shape[-2:])
    lead = weight.shape[:-2]
    flat = weight.reshape(-1, *weight.shape[-2:])
    pairs = factorize(list(flat), rank, method=method, niter=niter, seed=seed)
    a = torch.stack([p[0] for p in pairs]).reshape(*lead, weight.shape[-2], rank)
    b = torch.stack([p[1] for p in pairs]).reshape(*lead, rank, weight.shape[-1])
    return a, b


RankRule = Union[int, Sequence[int], Callable[[List[torch.Tensor]], Sequence[int]]]


def factorize(
        matrices: Sequence[torch.Tensor],
        rank: RankRule,
        method: str = 'gram',
        whitening: Optional[Sequence[Optional[torch.Tensor]]] = None,
        niter: int = 4,
        seed: Optional[int] = None,
        chunk: Optional[int] = None,
) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """The one factorization of toukit: (A_i, B_i) with A_i B_i the rank-r_i truncation of each matrix W_i.

    One batched SVD per distinct shape (`svd_many`). Plain: A = U_r S_r, B = V_r^T. With a whitening factor L_i
    (`whitening_factor` of the layer's inputs), the truncation is of W_i L_i and B = V_r^T L_i^{-1} (SVD-LLM's
    truncation-aware whitening; Wang et al., 2024, arXiv:2403.07378): A B is the rank-r matrix closest to W on the
    layer's inputs, and the pair is rebalanced (`balance_factors`) so that B's rows have unit norm, as plain TOU's do.

    Args:
        matrices: the weights (out x in each); fp16/bf16 are factorized in float32, whitened ones in float64.
        rank: one int for all, one per matrix, or a function of all the matrices' singular values (of W L when
            whitened) returning one rank per matrix (spectrum-based policies; the whole spectrum is computed then).
        method: 'gram', 'exact' or 'randomized' (see `truncated_svd`); whitened matrices always use 'exact'.
        whitening: per matrix, its whitening factor L or None; None for none at all.
        niter, seed: the randomized method's subspace iterations and sketch seed.
        chunk: at most this many matrices per batched call (bounds the workspace; None: one call per shape).

    Returns:
        (A, B) per matrix, in its dtype.
    """
    matrices = list(matrices)
    out = [None] * len(matrices)
    for i, pair in factorize_iter(matrices, rank, method, whitening, niter, seed, chunk):
        out[i] = pair
    return out


def factorize_iter(
        matrices: List[Optional[torch.Tensor]],
        rank: RankRule,
        method: str = 'gram',
        whitening: Optional[Sequence[Optional[torch.Tensor]]] = None,
        niter: int = 4,
        seed: Optional[int] = None,
        chunk: Optional[int] = None,
) -> Iterator[Tuple[int, Tuple[torch.Tensor, torch.Tensor]]]:
    """`factorize`, streamed: yields (i, (A_i, B_i)) as each batched call finishes, in shape-group order.

    Memory stays bounded by one batch, not the model: a matrix is upcast (or whitened) only inside its batch, a
    batch keeps only its truncated factors, and `matrices` (a list) is consumed: each entry is set to None once
    stacked, so the caller's weight can be freed as soon as it drops its own reference. With a spectrum-based
    `rank` and a `chunk`, the spectra are computed in a first pass of batches and the factors in a second (twice
    the SVD work, bounded memory); without a chunk, every matrix's whole SVD (and every W L) is held until the
    rule has seen them all. Every rank is checked before the first pair is yielded. The factors with and without
    a chunk are equal up to rounding (a spectrum rule's second pass forms only the kept vectors).
    """
    if not isinstance(matrices, list):
        raise TypeError(f'factorize_iter: matrices must be a list (it is consumed), not {type(matrices).__name__}')
    if not matrices:
        return
    steps = _FactorSteps(matrices, whitening)
    if steps.whitened:
        method = 'exact'
    shapes = [tuple(w.shape[-2:]) for w in matrices]
    if callable(rank) and chunk is None:  # every whole SVD at once: the rule needs all spectra
        svds = svd_many([steps.prepared(i, w) for i, w in enumerate(matrices)], rank=None, method=method, niter=niter,
                        seed=seed)
        matrices[:] = [None] * len(matrices)
        ranks = _checked_ranks(rank([s for _, s, _ in svds]), shapes)
        for i, (usv, r) in enumerate(zip(svds, ranks)):
            svds[i] = None
            yield i, steps.truncated(i, usv, r)
        return
    if callable(rank):  # first pass: the spectra only, batch by batch (the same routine as the second pass)
        ranks = _checked_ranks(rank(_first_pass_spectra(matrices, steps, method, niter, seed, chunk)), shapes)
    else:
        ranks = _checked_ranks([rank] * len(matrices) if isinstance(rank, int) else rank, shapes)
    top = max(ranks)

    def batch(shape, idx, stack):
        usvs = zip(*_svd(stack, min(top, min(shape)), method, niter, seed))
        return (steps.truncated(i, usv, ranks[i]) for i, usv in zip(idx, usvs))
    yield from _per_shape_iter(matrices, batch, chunk, steps.prepared, steps.kind, consume=True)


class _FactorSteps:
    """What `factorize_iter` does to matrix i before its SVD (`prepared`) and after it (`truncated`), given the
    matrices' whitening factors (None: plain)."""

    def __init__(self, matrices: Sequence[torch.Tensor], whitening: Optional[Sequence[Optional[torch.Tensor]]]):
        self.whitening = list(whitening) if whitening is not None else [None] * len(matrices)
        if len(self.whitening) != len(matrices):
            raise ValueError(f'factorize: {len(self.whitening)} whitening factors for {len(matrices)} matrices')
        for i, factor in enumerate(self.whitening):
            width = matrices[i].shape[-1]
            if factor is not None and factor.shape != (width, width):
                raise ValueError(f"whitening factor of shape {tuple(factor.shape)} does not match the weight's input "
                                 f"width {width}")
        self.whitened = any(f is not None for f in self.whitening)
        self.dtypes = [w.dtype for w in matrices]

    def prepared(self, i: int, w: torch.Tensor) -> torch.Tensor:
        """The matrix the SVD sees: W in float32 (fp16/bf16) or as given, or W L in float64 when whitened."""
        if self.whitening[i] is None:
            return _work_dtype(w)
        return w.detach().to(torch.float64) @ self.whitening[i].to(w.device, torch.float64)

    def truncated(self, i: int, usv, r: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of rank r from the SVD of matrix i's prepared form, in the matrix's dtype."""
        u, s, vh = usv
        a, b = u[:, :r] * s[:r], vh[:r]
        if self.whitening[i] is not None:
            a, b = balance_factors(a, unwhiten(b, self.whitening[i].to(b.device, b.dtype)))
        return a.to(self.dtypes[i]).contiguous(), b.to(self.dtypes[i]).contiguous()

    def kind(self, i: int) -> bool:
        """Whitened and plain matrices are prepared in different dtypes: never in one stack."""
        return self.whitening[i] is not None


def _checked_ranks(ranks: Sequence[int], shapes: Sequence[Tuple[int, int]]) -> List[int]:
    """Every rank, checked against its matrix before the first pair is yielded (a rule's answers too)."""
    ranks = list(ranks)
    if len(ranks) != len(shapes):
        raise ValueError(f'factorize: {len(ranks)} ranks for {len(shapes)} matrices')
    for r, shape in zip(ranks, shapes):
        check_rank(r, shape)
    return ranks


def _first_pass_spectra(matrices: List[torch.Tensor], steps: _FactorSteps, method: str, niter: int,
                        seed: Optional[int], chunk: Optional[int]) -> List[torch.Tensor]:
    """Every prepared matrix's singular values, batch by batch, with the routine of the factorizing pass (so the
    same values, and the same ranks, as it would see)."""
    def spectrum(shape, idx, stack):
        s = _gram_svd(stack, 1)[1] if method == 'gram' else _svd(stack, None, method, niter, seed)[1]
        return s.unbind(0)
    return _per_shape(matrices, spectrum, chunk, steps.prepared, steps.kind)


def _per_shape_iter(matrices: List[Optional[torch.Tensor]], fn, chunk: Optional[int] = None, prepare=None,
                    kind=None, consume: bool = False) -> Iterator[Tuple[int, object]]:
    """Yields (i, result) of fn(shape, indices, stack) over stacks of same-(shape, dtype, device) matrices, `chunk`
    at most per stack (None: one stack per shape). `prepare(i, matrix)` maps each matrix before it is stacked
    (an upcast, say), so the prepared copies are made one stack at a time; `kind(i)` separates matrices that
    `prepare` treats differently. Chunks bound the workspace: a stack, its Gram matrices and their eigenvectors
    are a few times `chunk` matrices, not a few times the model. With `consume`, each entry of `matrices` is set
    to None once stacked."""
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f'chunk={chunk!r}: must be an int >= 1 (matrices per batched call) or None')
    groups = {}
    for i, m in enumerate(matrices):
        groups.setdefault((tuple(m.shape), m.dtype, m.device, kind(i) if kind else None), []).append(i)
    m = None  # the loop's last matrix: held by this frame, it would outlive its consumed entry
    for (shape, _, _, _), idx in groups.items():
        step = chunk or len(idx)
        for start in range(0, len(idx), step):
            part = idx[start:start + step]
            stack = None  # filled one matrix at a time: no list of prepared copies beside the stack
            for j, i in enumerate(part):
                m = matrices[i] if prepare is None else prepare(i, matrices[i])
                if stack is None:
                    stack = torch.empty((len(part), *m.shape), dtype=m.dtype, device=m.device)
                stack[j].copy_(m)
                del m
            if consume:
                for i in part:
                    matrices[i] = None
            yield from zip(part, fn(tuple(stack.shape[-2:]), part, stack))
            del stack


def _per_shape(matrices: Sequence[torch.Tensor], fn, chunk: Optional[int] = None, prepare=None, kind=None) -> list:
    """`_per_shape_iter`'s results in input order."""
    out = [None] * len(matrices)
    for i, result in _per_shape_iter(list(matrices), fn, chunk, prepare, kind):
        out[i] = result
    return out


def svd_many(
        matrices: Sequence[torch.Tensor],
        rank: Optional[int] = None,
        method: str = 'exact',
        niter: int = 4,
        seed: Optional[int] = None,
        chunk: Optional[int] = None,
) -> List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(U, S, Vh) of each matrix, computed with one batched SVD per distinct shape (per `chunk` matrices of it).

    A loop of SVDs over a transformer's 72 block matrices costs several times one batched call per shape.
    With `rank` (required by the randomized method) the factors are truncated to min(rank, min(shape)).
    """
    def batch(shape, idx, stack):
        r = None if rank is None else min(rank, min(shape))
        return zip(*_svd(stack, r, method, niter, seed))
    return _per_shape(matrices, batch, chunk, lambda i, m: _work_dtype(m))


def singular_values_many(matrices: Sequence[torch.Tensor], chunk: Optional[int] = None,
                         whitening: Optional[Sequence[Optional[torch.Tensor]]] = None) -> List[torch.Tensor]:
    """Singular values (float64, CPU, descending) of each matrix (of W L where `whitening` gives a factor L), one
    batched call per distinct shape, per `chunk` matrices of it: the float64 copies are made one batch at a time."""
    def prepare(i, m):
        m = m.detach().to('cpu', torch.float64)
        return m if whitening is None or whitening[i] is None else m @ whitening[i].to('cpu', torch.float64)
    return _per_shape(matrices, lambda shape, idx, stack: torch.linalg.svdvals(stack).unbind(0), chunk, prepare)


def energy_curve(singular_values: torch.Tensor) -> torch.Tensor:
    """Cumulative energy: entry k-1 is sum_{i<k} sigma_i^2 / sum_i sigma_i^2 (last entry is 1)."""
    e = singular_values.to(torch.float64) ** 2
    return torch.cumsum(e, dim=-1) / e.sum(dim=-1, keepdim=True)


def rank_for_energy(singular_values: torch.Tensor, threshold: float) -> int:
    """Smallest k whose cumulative energy reaches `threshold` (in (0, 1])."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise ValueError(f'energy threshold={threshold!r}: must be a number in (0, 1]')
    curve = energy_curve(singular_values)
    # a relative tolerance keeps threshold=1.0 from asking for rank beyond the last (rounded) value
    bound = torch.tensor([threshold - 1e-12], dtype=curve.dtype, device=curve.device)
    k = int(torch.searchsorted(curve, bound).item()) + 1
    return min(k, curve.numel())


def stable_rank(singular_values: torch.Tensor) -> float:
    """||W||_F^2 / ||W||_2^2, from the singular values."""
    s = singular_values.to(torch.float64)
    return float((s ** 2).sum() / s[0] ** 2)


def effective_rank(singular_values: torch.Tensor) -> float:
    """Roy and Vetterli's effective rank: exp of the entropy of sigma / sum(sigma)."""
    s = singular_values.to(torch.float64)
    p = s / s.sum()
    p = p[p > 0]
    return float(math.exp(-(p * p.log()).sum()))


def relative_error(singular_values: torch.Tensor, rank: int) -> float:
    """||W - W_k||_F / ||W||_F of the rank-k truncation: sqrt of the tail energy."""
    s = singular_values.to(torch.float64)
    check_rank(rank, (s.numel(), s.numel()), 'singular values')
    return float(((s[rank:] ** 2).sum() / (s ** 2).sum()).sqrt())


def whitening_factor(inputs: torch.Tensor, damping: float = 1e-6) -> torch.Tensor:
    """Lower Cholesky factor L of X^T X + lambda I (float64), lambda = `damping` times the mean diagonal.

    `inputs` (rows x in) are a layer's inputs; ||(W - W') L||_F = ||X (W - W')^T||_F up to the damping, so a
    truncation that is optimal for W L is optimal for the layer's outputs on X (SVD-LLM, Wang et al. 2024).
    """
    x = inputs.detach().reshape(-1, inputs.shape[-1]).to(torch.float64)
    gram = x.T @ x
    lam = damping * float(gram.diagonal().mean().clamp_min(1e-12))
    return torch.linalg.cholesky(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device))


def unwhiten(right: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """V^T L^{-1}: right singular vectors of W L (rows, or a batch of them) back in W's input coordinates."""
    return torch.linalg.solve_triangular(factor, right, upper=False, left=False)


def balance_factors(a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(A D, D^{-1} B) with D = diag of B's row norms: the same product, every row of B of unit norm.

    Activation-aware B = V_r^T L^{-1} has rows of norm about 1 / (input scale x sqrt(calibration rows)): on
    MiniLM with 4 BBC batches, 25x shorter than plain TOU's unit rows, so noise of a fixed alpha and AdamW's
    fixed-size steps were 25x larger relative to B, and training collapsed. Unit rows give both factorizations
    the same scale for alpha and the learning rate. Works on a batch (... x out x r, ... x r x in).
    """
    norms = torch.linalg.vector_norm(b, dim=-1, keepdim=True).clamp_min(torch.finfo(b.dtype).tiny)
    return a * norms.transpose(-1, -2), b / norms
