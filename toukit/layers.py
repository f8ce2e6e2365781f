"""Factorized linear layers: TOU's FactorizedLinear (and its ablation with the truncation residual kept), its relatives
SVFit and DeLoRA, and the bottleneck adapter.

Each layer is built from an existing dense layer with `from_linear`, which keeps a weightless template of that
layer (its class, layout and attributes). `effective_weight()` is the one place the layer's matrix is formed (merge
and analysis use it, and SVFit's forward where that is cheaper; no other forward does), and `merge()` restores the
template with that weight: the original class (nn.Linear, any subclass of it, or transformers' Conv1D), its layout,
and a bias exactly when it had one.
Trainable tensors carry a method prefix (`tou_B`, `svfit_s`, `delora_M`, `adapter_down`/`adapter_up`) so a name
filter finds them. The adapter adds computation after its linear, so it has no merge: it is the one layer here
that stays in the model. `QKVSplit` shows a fused q/k/v projection as three linears (`split_qkv`, `fuse_qkv`).
"""
import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .linalg import check_finite, check_rank, factorize
from .targets import (dense_template, dense_weight, fused_splits, get_submodule_parent, is_dense, model_family,
                      qkv_blocks, restore_dense)

__all__ = ['ToukitLayer', 'WeightInfo', 'FactorizedLinear', 'ResidualFactorizedLinear', 'SVFitLinear', 'DeLoRALinear',
           'AdapterLinear', 'QKVSplit', 'split_qkv', 'fuse_qkv']


class WeightInfo:
    """What library code may read from a toukit layer's `.weight` without the matrix being formed: its `dtype`,
    `device` and `shape` (Hugging Face code reads `module.weight.dtype` in some forwards, T5's feed-forward among
    them). It is not a tensor: anything else raises an AttributeError that says to call `effective_weight()`."""
    __slots__ = ('dtype', 'device', 'shape', 'owner')

    def __init__(self, dtype: torch.dtype, device: torch.device, shape: torch.Size, owner: str):
        self.dtype, self.device, self.shape, self.owner = dtype, device, shape, owner

    def __getattr__(self, name: str):
        raise AttributeError(f'{self.owner}.weight is not a tensor (no {name!r}): the layer never forms its matrix in '
                             f'a forward; call effective_weight() for it, or merge() the model first')

    def __repr__(self) -> str:
        return f'WeightInfo({self.owner}, shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})'


class ToukitLayer(nn.Module):
    """Base of toukit's layers: `effective_weight()` (out x in), a `bias`, and `merge()` back to the dense layer
    they were built from.

    `.weight` is a `WeightInfo` (dtype, device, shape), not the matrix, so code that reads `module.weight.dtype`
    never forms A B; a write to `.weight` raises. Under `nn.MultiheadAttention`, which reads `out_proj.weight` as
    a matrix in its own forward, `read_by_parent` is set (by `toukit.apply_method`) and `.weight` then forms the
    effective weight there, deliberately: besides SVFit's own forward (which forms its weight where that is
    cheaper), the one place a toukit layer's product enters a forward.
    """
    in_features: int
    out_features: int
    bias: Optional[nn.Parameter]
    read_by_parent: bool = False

    def effective_weight(self) -> torch.Tensor:
        """The matrix the layer computes with, (out x in)."""
        raise NotImplementedError

    @property
    def weight(self):
        if self.read_by_parent:
            return self.effective_weight()
        ref = next(iter(self.parameters()))
        return WeightInfo(ref.dtype, ref.device, torch.Size((self.out_features, self.in_features)), type(self).__name__)

    def __setattr__(self, name: str, value) -> None:
        if name == 'weight':
            raise ValueError(f'{type(self).__name__}.weight is formed from the layer\'s factors; a write to it would '
                             f'be lost: write the factors, or merge() first and write the merged layer\'s weight')
        super().__setattr__(name, value)

    @property
    def template(self) -> Optional[nn.Module]:
        """The weightless template of the dense layer this one was built from (None: built by its constructor)."""
        return self.__dict__.get('_template')

    def _keep_template(self, linear: nn.Module) -> None:
        self.__dict__['_template'] = dense_template(linear)  # not a submodule: never in state_dict or parameters()

    def merge(self) -> nn.Module:
        """The dense layer this one was built from, restored (class, layout, attributes, bias or none) with the
        effective weight; an nn.Linear for a layer built by its constructor. Refuses non-finite weights."""
        with torch.no_grad():
            weight = self.effective_weight().detach()
            check_finite(weight, f'{type(self).__name__} weight at merge')
            bias = None if self.bias is None else self.bias.detach()
            template = self.template
            if template is None:
                template = dense_template(nn.Linear(self.in_features, self.out_features, bias=bias is not None,
                                                    device='meta'))
            return restore_dense(template, weight, bias)

    def extra_repr(self) -> str:
        return f'in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}'


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


def _check_dense(linear: nn.Module, name: str) -> torch.Tensor:
    """`linear`'s weight as (out x in), detached; a ValueError unless it is nn.Linear (or a subclass) or Conv1D."""
    if not is_dense(linear):
        own = ' with a forward of its own (it computes something other than x W^T + b)' if isinstance(
            linear, nn.Linear) else ''
        raise ValueError(f'{name}: expected nn.Linear or Conv1D, got {type(linear).__name__}{own}')
    return dense_weight(linear).detach()


class FactorizedLinear(ToukitLayer):
    """TOU: y = A (B x) + bias with W ~ A B, A = U_r S_r frozen and B = V_r^T trained.

    A fused projection (a ViT's q/k/v) is held as `splits` independent factorizations of its equal row
    blocks: B stacks the splits' right factors (splits*r x in, one matmul) and A holds the left factors as a
    batch (splits x out/splits x r), applied block-diagonally by one batched matmul. No A B product is formed
    in the forward pass.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, splits: int = 1, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        if splits < 1 or out_features % splits:
            raise ValueError(f'splits={splits!r}: must divide out_features={out_features}')
        check_rank(rank, (out_features // splits, in_features), 'FactorizedLinear')
        self.in_features, self.out_features, self.rank, self.splits = in_features, out_features, rank, splits
        kw = dict(device=device, dtype=dtype)
        self.tou_A = _frozen(torch.zeros(splits, out_features // splits, rank, **kw))
        self.tou_B = nn.Parameter(torch.zeros(splits * rank, in_features, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None

    @classmethod
    def from_linear(
            cls,
            linear: nn.Linear,
            rank: int,
            noise_scale: float = 0.0,
            seed: Optional[int] = None,
            splits: int = 1,
            factors: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
            svd_method: str = 'exact',
            name: str = 'linear',
    ) -> 'FactorizedLinear':
        """Factorize `linear` by truncated SVD, adding N(0, noise_scale^2) to both factors.

        Args:
            linear: the layer to replace; left untouched.
            rank: r, per split.
            noise_scale: the paper's alpha; 0 keeps the exact truncated SVD.
            seed: seeds the noise.
            splits: equal row blocks factorized separately (3 for a fused q/k/v projection).
            factors: precomputed (A, B) of shapes (splits, out/splits, r) and (splits, r, in), e.g. from a
                batched SVD over many layers; computed here when None.
            svd_method: 'exact' or 'randomized' (see `toukit.linalg.truncated_svd`).
            name: the layer's name, for error messages.
        """
        weight = _check_dense(linear, name)
        if isinstance(noise_scale, bool) or not isinstance(noise_scale, (int, float)) or not (
                math.isfinite(noise_scale) and noise_scale >= 0):
            raise ValueError(f'noise_scale={noise_scale!r} for {name}: must be a finite number >= 0')
        if factors is None:  # given factors come from a caller that checked the weight (apply_tou)
            check_finite(weight, f'{name}.weight')
        out_f, in_f = weight.shape
        layer = cls(in_f, out_f, rank, splits=splits,
                    bias=linear.bias is not None, device=weight.device, dtype=weight.dtype)
        layer._keep_template(linear)
        if factors is None:
            pairs = factorize(list(weight.view(splits, out_f // splits, in_f)), rank, method=svd_method, seed=seed)
            a, b = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        else:
            a, b = factors
        with torch.no_grad():
            layer.tou_A.copy_(a)
            layer.tou_B.copy_(b.reshape(splits * rank, in_f))
            if noise_scale > 0:  # drawn on the factors' device in their dtype: no full-size pass through the host
                gen = torch.Generator(device=layer.tou_A.device)
                gen.manual_seed(0 if seed is None else seed)
                for factor in (layer.tou_A, layer.tou_B):
                    factor.add_(torch.randn(factor.shape, generator=gen, device=factor.device, dtype=factor.dtype)
                                * noise_scale)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        if layer.bias is not None:
            layer.bias.requires_grad_(linear.bias.requires_grad)
        return layer

    def effective_weight(self) -> torch.Tensor:
        """A B, with the splits' blocks stacked: (out x in)."""
        b = self.tou_B.view(self.splits, self.rank, self.in_features)
        return torch.bmm(self.tou_A, b).reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # tokens folded into one 2-D matmul by hand: F.linear on a 3-D input without a bias goes through
        # aten::matmul's reshape and _unsafe_view (more operators per step, each a dispatch and on a GPU a launch)
        lead = x.shape[:-1]
        h = torch.mm(x.reshape(-1, self.in_features), self.tou_B.t())  # all splits' right factors in one matmul
        if self.splits == 1:
            a = self.tou_A.view(self.out_features, self.rank).t()
            y = torch.mm(h, a) if self.bias is None else torch.addmm(self.bias, h, a)
            return y.view(*lead, self.out_features)
        # the left factors as one batched matmul over the splits, bias fused: (splits, tokens, out / splits)
        h = h.view(-1, self.splits, self.rank).transpose(0, 1)
        o = self.out_features // self.splits
        if self.bias is None:
            y = torch.bmm(h, self.tou_A.mT)
        else:
            y = torch.baddbmm(self.bias.view(self.splits, 1, o), h, self.tou_A.mT)
        return y.transpose(0, 1).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return super().extra_repr() + f', rank={self.rank}, splits={self.splits}'


class ResidualFactorizedLinear(FactorizedLinear):
    """TOU with the truncation residual kept: y = R x + A (B x) + bias, R = W - A_0 B_0 frozen.

    R holds what the truncation (and the noise) took from W, so the layer starts out computing W exactly (up to
    rounding); A is frozen and B trains as in TOU, so the update A (B - B_0) still lies in the span of A's columns,
    W's top-r left singular directions. The ablation that separates TOU's truncation from its restriction.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, splits: int = 1, bias: bool = True,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, rank, splits=splits, bias=bias, device=device, dtype=dtype)
        self.tou_R = _frozen(torch.zeros(out_features, in_features, device=device, dtype=dtype))

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, **options) -> 'ResidualFactorizedLinear':
        """As `FactorizedLinear.from_linear` (same options), then R = W - A B of the noisy factors, in float64."""
        layer = super().from_linear(linear, rank, **options)
        with torch.no_grad():
            product = FactorizedLinear.effective_weight(layer).double()
            layer.tou_R.copy_(dense_weight(linear).double() - product)
        return layer

    def effective_weight(self) -> torch.Tensor:
        return self.tou_R + super().effective_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + F.linear(x, self.tou_R)


class SVFitLinear(ToukitLayer):
    """SVFit: W = W_res + U_r diag(s) V_r^T with only the top-r singular values `svfit_s` trained.

    W_res is the part of W outside the top-r singular directions, so the layer starts out computing W exactly
    (up to rounding) and the update can only rescale the top-r directions.

    All three stored matrices are needed: U_r and V_r^T are the directions s scales, and W_res (the rest of W) cannot
    be rebuilt from them; storing W instead of W_res would save nothing and change what `base_weight` holds in
    saved checkpoints. The forward takes the cheaper of two equal computations (`_forms_weight`): at the ranks
    SVFit is used at (99% energy is near full rank) it forms W once per call and runs one dense matmul.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        check_rank(rank, (out_features, in_features), 'SVFitLinear')
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        kw = dict(device=device, dtype=dtype)
        self.base_weight = _frozen(torch.zeros(out_features, in_features, **kw))
        self.svfit_U = _frozen(torch.zeros(out_features, rank, **kw))
        self.svfit_Vh = _frozen(torch.zeros(rank, in_features, **kw))
        self.svfit_s = nn.Parameter(torch.zeros(rank, **kw))
        self.bias = _frozen(torch.zeros(out_features, **kw)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, name: str = 'linear',
                    svd: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None) -> 'SVFitLinear':
        """Split `linear`'s weight into its top-`rank` singular triplets (s trained) and a frozen residual.

        Args:
            svd: the weight's (U, S, Vh) in float64, e.g. from one batched SVD over many layers
                (`toukit.linalg.svd_many`); computed here when None.
        """
        weight = _check_dense(linear, name)
        check_finite(weight, f'{name}.weight')
        out_f, in_f = weight.shape
        check_rank(rank, (out_f, in_f), name)
        layer = cls(in_f, out_f, rank, bias=linear.bias is not None, device=weight.device, dtype=weight.dtype)
        layer._keep_template(linear)
        u, s, vh = svd if svd is not None else torch.linalg.svd(weight.double(), full_matrices=False)
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
        with torch.no_grad():
            layer.base_weight.copy_(weight.double() - (u * s) @ vh)
            layer.svfit_U.copy_(u)
            layer.svfit_Vh.copy_(vh)
            layer.svfit_s.copy_(s)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def effective_weight(self) -> torch.Tensor:
        """W_res + U_r diag(s) V_r^T, (out x in); differentiable in s."""
        return torch.addmm(self.base_weight, self.svfit_U * self.svfit_s, self.svfit_Vh)

    def _forms_weight(self, tokens: int) -> bool:
        """Whether forming W costs fewer multiply-adds than the factored path for `tokens` input rows.

        Formed: W (out*in*r), then x W^T; in training also dx, dW (the weight gradient a frozen layer never needs)
        and ds = diag(U^T dW V) (out*in*r again). Factored: x W_res^T plus x V_r (in*r per token) and that times s
        through U_r^T (r*out per token); in training also dx through both and ds from per-token products.
        Forward only, r cancels: formed wins once tokens*(in+out) > out*in. Training: formed wins at high rank
        and many tokens (0.99-energy ranks at a training batch); few tokens or a small rank keep the factored path.
        """
        o, i, r = self.out_features, self.in_features, self.rank
        if torch.is_grad_enabled() and self.svfit_s.requires_grad:
            return tokens * o * i + 2 * o * i * r < 2 * tokens * r * (i + o)
        return o * i < tokens * (i + o)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Both paths compute x (W_res + U_r diag(s) V_r^T)^T + b and differ only in rounding. Memory: in training the
        # formed path holds one out x in W per layer until backward (for dx) and the layer's input (for dW), where the
        # factored path holds one tokens x r product (for ds); backward adds a transient out x in dW (measured on
        # MiniLM: benchmarks/svfit_floor.py, BENCHMARKS.md).
        if self._forms_weight(x.numel() // self.in_features):
            return F.linear(x, self.effective_weight(), self.bias)
        low = F.linear(F.linear(x, self.svfit_Vh) * self.svfit_s, self.svfit_U)
        return F.linear(x, self.base_weight, self.bias) + low

    def extra_repr(self) -> str:
        return super().extra_repr() + f', rank={self.rank}'


class DeLoRALinear(ToukitLayer):
    """DeLoRA: W + scaling * B M A with random A (r x in) and B (out x r) frozen and M (r x r) trained.

    M starts at zero, so the layer starts out computing W exactly; r^2 parameters train per matrix.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, scaling: float = 1.0, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        check_rank(rank, (out_features, in_features), 'DeLoRALinear')
        self.in_features, self.out_features, self.rank, self.scaling = in_features, out_features, rank, scaling
        kw = dict(device=device, dtype=dtype)
        self.base_weight = _frozen(torch.zeros(out_features, in_features, **kw))
        self.delora_A = _frozen(torch.zeros(rank, in_features, **kw))
        self.delora_B = _frozen(torch.zeros(out_features, rank, **kw))
        self.delora_M = nn.Parameter(torch.zeros(rank, rank, **kw))
        self.bias = _frozen(torch.zeros(out_features, **kw)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, scaling: float = 1.0, seed: Optional[int] = None,
                    name: str = 'linear') -> 'DeLoRALinear':
        """Wrap `linear` with frozen N(0, 1/in) and N(0, 1/r) random factors and a zero r x r core."""
        weight = _check_dense(linear, name)
        check_finite(weight, f'{name}.weight')
        out_f, in_f = weight.shape
        check_rank(rank, (out_f, in_f), name)
        layer = cls(in_f, out_f, rank, scaling, bias=linear.bias is not None, device=weight.device,
                    dtype=weight.dtype)
        layer._keep_template(linear)
        gen = torch.Generator(device='cpu')
        gen.manual_seed(0 if seed is None else seed)
        with torch.no_grad():
            layer.base_weight.copy_(weight)
            layer.delora_A.copy_(torch.randn(rank, in_f, generator=gen) / math.sqrt(in_f))
            layer.delora_B.copy_(torch.randn(out_f, rank, generator=gen) / math.sqrt(rank))
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def effective_weight(self) -> torch.Tensor:
        return self.base_weight + self.scaling * (self.delora_B @ self.delora_M @ self.delora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = F.linear(F.linear(F.linear(x, self.delora_A), self.delora_M), self.delora_B)
        return F.linear(x, self.base_weight, self.bias) + self.scaling * low

    def extra_repr(self) -> str:
        return super().extra_repr() + f', rank={self.rank}, scaling={self.scaling:g}'


class AdapterLinear(nn.Module):
    """A bottleneck adapter (Houlsby et al., 2019) after a linear: y = W x + b, then y + up(gelu(down(y))).

    Placed on a block's attention output and MLP output projections, this is Houlsby's adapter before the
    residual connection (the block's dropout then follows the adapter rather than preceding it; they commute in
    evaluation). `adapter_up` starts at zero, so the layer starts out computing the linear exactly. The wrapped
    linear is frozen by the method; only the adapter's down and up projections (with biases) train. There is no
    merge: the adapter adds `2 * width * out + width + out` parameters and their computation at inference.
    """

    def __init__(self, base: nn.Linear, width: int):
        super().__init__()
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f'adapter width={width!r}: must be an int >= 1')
        self.base, self.width = base, width
        w = dense_weight(base)
        self.adapter_down = nn.Linear(w.shape[0], width, device=w.device, dtype=w.dtype)
        self.adapter_up = nn.Linear(width, w.shape[0], device=w.device, dtype=w.dtype)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, width: int, seed: Optional[int] = None,
                    name: str = 'linear') -> 'AdapterLinear':
        """Wrap `linear` (kept as `base`, not copied) with a zero-started adapter of `width`; seeds `down`'s init."""
        _check_dense(linear, name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0 if seed is None else seed)
            return cls(linear, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        return y + self.adapter_up(F.gelu(self.adapter_down(y)))

    def extra_repr(self) -> str:
        return f'width={self.width}'


class QKVSplit(nn.Module):
    """A fused q/k/v projection seen as three linears `q`, `k`, `v`; the output is their concatenation.

    Methods that act on separate square matrices (LoRA through peft, SVFit, DeLoRA) use this view, so every
    method sees the attention as the TOU paper counts it; `fuse_qkv` turns it back into one nn.Linear.
    """

    def __init__(self, q: nn.Module, k: nn.Module, v: nn.Module):
        super().__init__()
        self.q, self.k, self.v = q, k, v

    @classmethod
    def from_linear(cls, linear: nn.Module) -> 'QKVSplit':
        """Split a fused dense layer (nn.Linear or Conv1D) into three nn.Linear; `to_linear` restores its class."""
        weight = dense_weight(linear).detach()
        biases = qkv_blocks(linear.bias.detach()) if linear.bias is not None else (None,) * 3
        parts = []
        for block, bias in zip(qkv_blocks(weight), biases):
            part = nn.Linear(block.shape[1], block.shape[0], bias=bias is not None, device='meta', dtype=weight.dtype)
            part.requires_grad_(linear.weight.requires_grad)
            parts.append(restore_dense(part, block, bias))
        split = cls(*parts)
        split.__dict__['_template'] = dense_template(linear)  # not a submodule: to_linear restores it
        return split

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)

    def to_linear(self) -> nn.Module:
        """The fused layer again, of its original class (nn.Linear or Conv1D)."""
        parts = [self.q, self.k, self.v]
        if not all(isinstance(p, nn.Linear) for p in parts):
            raise ValueError('QKVSplit.to_linear: merge the q, k, v layers into nn.Linear first (toukit.merge)')
        bias = torch.cat([p.bias for p in parts]).detach() if parts[0].bias is not None else None
        weight = torch.cat([p.weight for p in parts]).detach()
        template = self.__dict__.get('_template') or dense_template(nn.Linear(
            weight.shape[1], weight.shape[0], bias=bias is not None, device='meta'))
        return restore_dense(template, weight, bias)


def split_qkv(model: nn.Module) -> List[str]:
    """Replace every fused q/k/v nn.Linear in the model by a QKVSplit; returns the names replaced."""
    replaced, family = [], model_family(model)
    for name, module in list(model.named_modules()):
        if fused_splits(family, name, module) == 3:
            parent, child = get_submodule_parent(model, name)
            setattr(parent, child, QKVSplit.from_linear(module))
            replaced.append(name)
    return replaced


def fuse_qkv(model: nn.Module) -> List[str]:
    """Turn every QKVSplit back into one nn.Linear; returns the names fused."""
    fused = []
    for name, module in list(model.named_modules()):
        if isinstance(module, QKVSplit):
            parent, child = get_submodule_parent(model, name)
            setattr(parent, child, module.to_linear())
            fused.append(name)
    return fused
