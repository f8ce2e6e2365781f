"""What fine-tuning did to each layer: the spectrum and the subspaces of the update dW = W_1 - W_0.

    table = toukit.update_table(pretrained, finetuned)            # two models of one architecture (merged)
    table = toukit.update_table(pretrained, state_dict)           # or the fine-tuned weights as a state dict
    table = toukit.update_table(pretrained, tou_model, start=...) # TOU's unmerged layers through effective_weight()

One row per targeted weight matrix (q, k and v of a fused projection apart), with W_0 the pretrained weight and W_1
the fine-tuned one. Every column is defined in `COLUMNS`. TOU's premise is that fine-tuning can stay inside each
layer's top-r left singular subspace (A = U_r S_r is frozen, so TOU's own update A (B_1 - B_0) lies in span(U_r) by
construction); the `left_energy_*` columns measure how much of any method's update does. The subspace similarity
and the amplification factor are the LoRA paper's (Hu et al., 2021, section 7). `update_summary` keeps what a run
record stores.
"""
import time
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import pandas as pd
import torch
from torch import nn

from .linalg import effective_rank, rank_for_energy, singular_values_many, stable_rank, svd_many
from .methods import method_label, method_names
from .ranks import DEFAULT_FRACTION, RankSpec, layer_policies
from .spectrum import layer_columns
from .targets import (QKV_PARTS, Targets, conv1d_orientation, dense_weight, is_conv1d, layer_matrices,
                      model_family, qkv_part)

__all__ = ['update_table', 'update_rows', 'update_summary', 'matched_weights', 'conv1d_names', 'records_updates',
           'median_table', 'own_updates', 'layer_roles', 'layer_type_table', 'format_layer_type_table',
           'UpdateBaseline', 'COLUMNS',
           'FIXED_RANKS', 'SIMILARITY_K', 'LEADING', 'LAYER_ROLES']

FIXED_RANKS = (8, 32)  # subspace sizes besides each layer's own TOU rank
SIMILARITY_K = (1, 8, 32)  # top-k singular vectors compared, besides the layer's rank
AMPLIFICATION_RANK = 8  # the LoRA paper's section 7.3 uses the update's top r directions (r = 4 and 64 there)
LEADING = 8  # dW's leading singular values kept in a record
SVD_METHOD = 'gram'  # eigh of each Gram matrix in float32, batched by shape: the summary takes seconds on a CPU

COLUMNS = {
    'relative_update': '||dW||_F / ||W_0||_F',
    'spectral_ratio': '||dW||_2 / ||W_0||_2',
    'stable_rank': "||dW||_F^2 / ||dW||_2^2 (0 for dW = 0)",
    'effective_rank': "exp of the entropy of dW's normalised singular values (Roy and Vetterli; 0 for dW = 0)",
    'rank_e50 / rank_e90 / rank_e99': "the smallest k whose top-k singular values hold that share of ||dW||_F^2",
    'left_energy_r': "||U_r^T dW||_F^2 / ||dW||_F^2, U_r the top-r left singular vectors of W_0, r the layer's rank "
                     "(left_energy_8, left_energy_32: r = 8, 32)",
    'right_energy_r': '||dW V_r||_F^2 / ||dW||_F^2, V_r the top-r right singular vectors of W_0 (likewise)',
    'random_left_r / random_right_r': 'what a random r-dimensional subspace holds on average: r / out, r / in',
    'left_similarity_k / right_similarity_k': '||U_0,k^T U_1,k||_F^2 / k: the LoRA paper\'s normalised subspace '
                                              'similarity of the top-k left (right) singular vectors of W_0 and W_1, '
                                              'for k = 1, 8, 32 and r (1: unrotated, 0: orthogonal)',
    'amplification': "||dW||_F / ||U^T W_0 V||_F, U and V the top-8 left and right singular vectors of dW (the LoRA "
                     "paper's section 7.3: how much dW amplifies directions W_0 does not emphasise; 0 for dW = 0)",
    'start_*': "the same from the method's own starting weight (TOU: A_0 B_0, truncation and noise included) instead "
               "of W_0 (still divided by ||W_0|| and projected on W_0's subspaces): relative_update, stable_rank, "
               "effective_rank, left_energy_r, right_energy_r",
}

Weights = Union[nn.Module, Mapping[str, torch.Tensor]]


def _ratio(num: torch.Tensor, den: torch.Tensor) -> float:
    """num / den as a float, 0 when den is 0 (an update of zero has no direction: its shares are reported as 0)."""
    return float(num / den) if float(den) > 0 else 0.0


def _energy_rank(s: torch.Tensor, level: float) -> int:
    return rank_for_energy(s, level) if float(s[0]) > 0 else 0


def _svds(matrices: Sequence[torch.Tensor]):
    """(U, S, V^T) of each matrix, from float32 Gram eigenproblems batched by shape (`SVD_METHOD`), returned in
    float64: the leading singular vectors the subspace columns read. Singular values below about 3e-4 of a matrix's
    largest lose their relative accuracy here, so the update's own spectrum (its ranks) is computed apart, exactly
    (`singular_values_many`, float64)."""
    return [tuple(t.double() for t in usv) for usv in svd_many([m.float() for m in matrices], method=SVD_METHOD)]


def update_rows(entries: Sequence[Tuple[str, Optional[str], torch.Tensor]], after: Sequence[torch.Tensor],
                start: Optional[Sequence[torch.Tensor]] = None, rank: Union[RankSpec, Mapping[str, object]] = None,
                family=None) -> pd.DataFrame:
    """The update table of matched matrices: `entries` (name, part, W_0), `after` the W_1 of each, `start` the
    method's own starting weight of each (None: W_0). `rank`: the layers' TOU ranks (any rank spec, or a rank
    pattern such as a record's `ranks`); default 0.375 of min(out, in). See `update_table`."""
    names = list(dict.fromkeys(name for name, _, _ in entries))
    rank = DEFAULT_FRACTION if rank is None else rank
    if isinstance(rank, Mapping) and '*' not in rank:  # a run's ranks name its targets only: the rest get the default
        rank = {**rank, '*': DEFAULT_FRACTION}
    policies = layer_policies(rank, names)
    w0 = [w.detach().to('cpu', torch.float64) for _, _, w in entries]
    w1 = [w.detach().to('cpu', torch.float64) for w in after]
    dw = [b - a for a, b in zip(w0, w1)]
    svd0, svd1, svdd = (_svds(m) for m in (w0, w1, dw))
    spectra = singular_values_many(dw)  # the update's whole spectrum in float64: its small values count in its ranks
    starts = None
    if start is not None:
        starts = [b - s.detach().to('cpu', torch.float64) for s, b in zip(start, w1)]
    spectra_start = singular_values_many(starts) if starts is not None else None
    rows = []
    for i, (name, part, _) in enumerate(entries):
        (u0, s0, v0h), (u1, _, v1h), (ud, _, vdh), sd = svd0[i], svd1[i], svdd[i], spectra[i]
        out_f, in_f = w0[i].shape
        policy = policies[name]  # a fixed rank above a matrix's smaller side is that side: the whole subspace
        r = min(int(policy.value), out_f, in_f) if policy.kind == 'fixed' else policy.resolve((out_f, in_f), s0, name)
        norm = dw[i].norm()
        row = dict(**layer_columns(family, name, part), out_features=out_f, in_features=in_f, rank=r,
                   relative_update=_ratio(norm, w0[i].norm()), spectral_ratio=_ratio(sd[0], s0[0]),
                   stable_rank=stable_rank(sd) if float(sd[0]) > 0 else 0.0,
                   effective_rank=effective_rank(sd) if float(sd[0]) > 0 else 0.0)
        for level in (0.5, 0.9, 0.99):
            row[f'rank_e{round(level * 100)}'] = _energy_rank(sd, level)
        for label, k in [('r', r)] + [(str(k), k) for k in FIXED_RANKS]:
            k = min(k, out_f, in_f)
            row[f'left_energy_{label}'] = _ratio((u0[:, :k].T @ dw[i]).square().sum(), norm ** 2)
            row[f'right_energy_{label}'] = _ratio((dw[i] @ v0h[:k].T).square().sum(), norm ** 2)
            row[f'random_left_{label}'], row[f'random_right_{label}'] = k / out_f, k / in_f
        for label, k in [(str(k), k) for k in SIMILARITY_K] + [('r', r)]:
            k = min(k, out_f, in_f)
            row[f'left_similarity_{label}'] = float((u0[:, :k].T @ u1[:, :k]).square().sum() / k)
            row[f'right_similarity_{label}'] = float((v0h[:k] @ v1h[:k].T).square().sum() / k)
        k = min(AMPLIFICATION_RANK, out_f, in_f)
        row['amplification'] = _ratio(norm, (ud[:, :k].T @ w0[i] @ vdh[:k].T).norm()) if float(norm) > 0 else 0.0
        if starts is not None:
            d, sd_start = starts[i], spectra_start[i]
            row.update(start_relative_update=_ratio(d.norm(), w0[i].norm()),
                       start_stable_rank=stable_rank(sd_start) if float(sd_start[0]) > 0 else 0.0,
                       start_effective_rank=effective_rank(sd_start) if float(sd_start[0]) > 0 else 0.0,
                       start_left_energy_r=_ratio((u0[:, :r].T @ d).square().sum(), d.norm() ** 2),
                       start_right_energy_r=_ratio((d @ v0h[:r].T).square().sum(), d.norm() ** 2))
        row['singular_values'] = sd[:LEADING].numpy()
        rows.append(row)
    return pd.DataFrame(rows)


def _matrix(source: Weights, name: str, part: Optional[str], shape: Tuple[int, int], conv1d: bool,
            modules: Optional[dict]) -> torch.Tensor:
    """The (out x in) matrix of layer `name` (its q/k/v `part`) in a model or a state dict, checked against `shape`."""
    if modules is not None:
        module = modules.get(name)
        if module is None:
            raise ValueError(f'{name}: no such layer in the fine-tuned model (of class '
                             f'{type(source).__name__}); are the two models of one architecture?')
        module = getattr(module, 'base', module)  # a bottleneck adapter wraps its (frozen) layer
        if not hasattr(module, 'effective_weight') and (
                hasattr(module, 'get_base_layer') or not isinstance(getattr(module, 'weight', None), torch.Tensor)):
            raise ValueError(f'{name}: a {type(module).__name__} holds no plain weight; merge the model first '
                             f'(toukit.merge)')
        weight = dense_weight(module)
    else:
        key = f'{name}.weight'
        if key not in source:
            raise ValueError(f'{name}: the state dict has no {key!r}')
        weight = conv1d_orientation(source[key], conv1d)
    weight = weight.detach()
    full = (shape[0] * (3 if part else 1), shape[1])
    if tuple(weight.shape) != full:
        raise ValueError(f'{name}: the fine-tuned weight has shape {tuple(weight.shape)} (out x in), the pretrained '
                         f'one {full}')
    return qkv_part(weight, part) if part else weight


def matched_weights(source: Weights, entries, conv1d: Sequence[str] = ()) -> List[torch.Tensor]:
    """The matrix of each of `entries` (name, part, W_0) in `source` (a model or a state dict); `conv1d` names the
    layers stored as (in x out) in a state dict."""
    modules = dict(source.named_modules()) if isinstance(source, nn.Module) else None
    if modules is None and not isinstance(source, Mapping):
        raise ValueError(f'expected a model or a state dict, got {type(source).__name__}')
    return [_matrix(source, name, part, tuple(w.shape), name in conv1d, modules) for name, part, w in entries]


def _matched(source: Weights, entries, pretrained: nn.Module) -> List[torch.Tensor]:
    if isinstance(source, nn.Module) and type(source) is not type(pretrained):
        raise ValueError(f'the models are of different architectures: {type(pretrained).__name__} and '
                         f'{type(source).__name__}')
    return matched_weights(source, entries, conv1d_names(pretrained))


def conv1d_names(model: nn.Module) -> List[str]:
    """The layers of `model` stored as (in x out): transformers' Conv1D."""
    return [n for n, m in model.named_modules() if is_conv1d(m)]


def update_table(pretrained: nn.Module, finetuned: Weights, targets: Targets = None,
                 rank: Union[RankSpec, Mapping[str, object]] = None, start: Optional[Weights] = None) -> pd.DataFrame:
    """One row per targeted weight matrix: what fine-tuning did to it (the columns are defined in `COLUMNS`).

    Args:
        pretrained: the model before fine-tuning (untouched: plain dense layers).
        finetuned: the fine-tuned model of the same architecture (merged, or with toukit's unmerged layers, read
            through their effective weight), or its state dict.
        targets: as `toukit.find_targets` on `pretrained` (default: every attention and MLP matrix).
        rank: each layer's TOU rank r (any rank spec or a rank pattern, e.g. a record's `ranks`); default 0.375 of
            min(out, in), the demo's.
        start: the method's own starting weights (a model or a state dict), e.g. TOU's factorized model before
            training: adds the `start_*` columns.

    Raises:
        ValueError: models of different classes, a layer missing from `finetuned` or `start`, a weight of another
            shape, or a layer of a method that is not merged (peft); the message names the layer.
    """
    entries = list(layer_matrices(pretrained, targets))
    after = _matched(finetuned, entries, pretrained)
    begin = _matched(start, entries, pretrained) if start is not None else None
    return update_rows(entries, after, begin, rank=rank, family=model_family(pretrained))


def update_summary(table: pd.DataFrame, digits: int = 5) -> Dict[str, object]:
    """What a run record keeps of an update table: every column per matrix, floats to `digits` significant digits,
    and dW's leading singular values (`LEADING`)."""
    def short(v):
        if isinstance(v, float):
            return float(f'{v:.{digits}g}')
        if hasattr(v, 'tolist'):
            return [float(f'{x:.{digits}g}') for x in v.tolist()]
        return v
    rows = [{k: short(v) for k, v in row.items() if not (k == 'part' and v is None)}
            for row in table.to_dict('records')]
    return dict(columns=COLUMNS, layers=rows)


MEDIAN_COLUMNS = ('relative_update', 'effective_rank', 'stable_rank', 'rank_e90', 'left_energy_r', 'random_left_r',
                  'right_energy_r', 'random_right_r', 'left_similarity_8', 'right_similarity_8', 'amplification')


def records_updates(records: Mapping[str, Sequence[dict]]) -> pd.DataFrame:
    """The update summaries of run records as one long table: method, seed, lr and every per-matrix column.

    Args:
        records: method -> its run records (e.g. `toukit.results.records_by_method`); a record without a summary
            (made before toukit recorded one) is left out.
    """
    rows = []
    for method, group in records.items():
        for record in group:
            config = record['run']['config']
            for layer in record.get('updates', {}).get('layers', []):
                rows.append(dict(method=method, seed=config['seed'], lr=config['lr'], **{
                    k: v for k, v in layer.items() if k != 'singular_values'}))
    return pd.DataFrame(rows)


def median_table(updates: pd.DataFrame, columns: Sequence[str] = MEDIAN_COLUMNS) -> pd.DataFrame:
    """Per method and layer kind, the median over matrices (and seeds) of the main columns."""
    columns = [c for c in columns if c in updates]
    return updates.groupby(['method', 'kind'], sort=False)[columns].median()


def own_updates(updates: pd.DataFrame) -> pd.DataFrame:
    """Each method's own update, for figures: the layers it changed only (dW = 0 rows dropped: LoRA's MLP, an
    adapter's targets), and for the TOU family the update from its own start A_0 B_0 (`start_*` columns) rather than
    from W_0, whose truncation would otherwise dominate every column that has a `start_*` twin."""
    out = updates.copy()
    started = out.start_relative_update.notna() if 'start_relative_update' in out else pd.Series(False, out.index)
    twins = {c[len('start_'):] for c in out.columns if c.startswith('start_')}
    for column in out.columns:
        if column.startswith('start_'):  # a started row shows its start twin, or nothing (a record without it)
            own = column[len('start_'):]
            out[own] = out[column].where(started, out[own])
        elif column in DW_COLUMNS and column not in twins:  # of the truncation, not of the training: not shown
            out.loc[started, column] = float('nan')
    return out[out.relative_update > 0].reset_index(drop=True)  # TOU frozen FFN's MLP: no update of its own


LAYER_ROLES = ('q', 'k', 'v', 'attention in', 'attention output', 'mlp in', 'mlp out', 'other')
LAYER_TYPE_COLUMNS = ('relative_update', 'effective_rank', 'stable_rank', 'left_energy_r', 'random_left_r',
                      'right_energy_r', 'random_right_r')


def layer_roles(updates: pd.DataFrame) -> pd.Series:
    """Each matrix's place in its block, from the rows of update summaries (`records_updates`: name, part, type,
    kind, in the model's module order): 'q', 'k', 'v', 'attention output', 'mlp in', 'mlp out'.

    As `toukit.targets.Family` defines them, a block's last attention layer is its attention output and its last MLP
    layer its MLP output (in BERT and in timm's ViT, the dense layer after the attention and the MLP's second
    layer). The q, k and v of a fused projection are its parts; separate ones are the three attention layers before
    the output, in order (query, key, value, as BERT and DINOv2 have them). Any other attention layer is 'attention in'
    (a block with two attention modules, as a decoder's cross-attention, calls only the last one's projection its
    output); a layer outside the blocks is 'other'.
    """
    part = updates['part'] if 'part' in updates else pd.Series(None, index=updates.index, dtype=object)
    task = updates['task'] if 'task' in updates else pd.Series('', index=updates.index, dtype=object)
    by_name = {}  # (task, name) -> role: two tasks' models may share a block's path and name its layers otherwise
    layers = updates.assign(part=part, task=task).drop_duplicates(['task', 'name'])
    blocks = layers.apply(lambda r: (r['task'], _block_module(r['name'], r['type'])), axis=1)
    for _, block in layers.groupby(blocks, sort=False):
        for kind, last in (('attention', 'attention output'), ('mlp', 'mlp out')):
            names = list(block.name[block.kind == kind])
            unfused = [n for n, p in zip(names[:-1], block.part[block.kind == kind]) if not isinstance(p, str)]
            first = QKV_PARTS if kind == 'attention' and len(unfused) == 3 else ()
            t = block.task.iloc[0]
            by_name.update({(t, n): first[i] if first else ('attention in' if kind == 'attention' else 'mlp in')
                            for i, n in enumerate(unfused)})
            by_name.update({(t, names[-1]): last} if names else {})
    fused = part.isin(QKV_PARTS) & (updates.kind == 'attention')
    roles = pd.Series([by_name.get(key) for key in zip(task, updates.name)], index=updates.index, dtype=object)
    return part.where(fused, roles).fillna('other').rename('role')


def _block_module(name: str, layer_type: str) -> str:
    """The block a layer belongs to, from its name and its type (the name without its block, `layer_type`)."""
    short = layer_type.split('[')[0].split('.*.')[-1]
    return name[:-len(short) - 1] if name.endswith('.' + short) else ''


def layer_type_table(updates: pd.DataFrame, methods: Sequence[str] = (), own: bool = True,
                     columns: Sequence[str] = LAYER_TYPE_COLUMNS) -> pd.DataFrame:
    """Per task, method and layer type (`layer_roles`: q, k, v, attention output, MLP in, MLP out), the median over
    matrices and seeds of the main update columns, beside the random subspace's share (`random_left_r`,
    `random_right_r`: r / out and r / in, one value per layer type where a kind's median would mix two shapes).

    Args:
        updates: `records_updates` rows, with a `task` column when they come from several tasks.
        methods: the rows' methods, in order; empty: every registered method, then any other the rows have. A
            method without a summary in a task is there too, 'not measured'.
        own: each method's own update (`own_updates`: TOU's from A_0 B_0, unchanged matrices left out, a layer type
            with none changed 'not changed'); False: dW from W_0 for every matrix.
        columns: the medians (those the rows have).

    Returns:
        One row per (task, method, layer type present in the task): task, method, role, layer (the model's own
        name of that type), seeds (records with a summary), matrices (changed ones), status ('measured',
        'not changed', 'not measured') and the medians.
    """
    updates = updates if 'task' in updates or updates.empty else updates.assign(task='')
    if updates.empty:
        return pd.DataFrame(columns=['task', 'method', 'role', 'layer', 'seeds', 'matrices', 'status'])
    updates = updates.assign(role=layer_roles(updates))
    changed = own_updates(updates) if own else updates
    columns = [c for c in columns if c in updates]
    keys = ['task', 'method', 'role']
    medians = changed.groupby(keys, sort=False)[columns].median()
    matrices = changed.groupby(keys, sort=False).name.nunique()
    seeds = updates.groupby(['task', 'method'], sort=False).seed.nunique()
    layer = updates.groupby(['task', 'role'], sort=False).type.agg(lambda t: ' / '.join(dict.fromkeys(t)))
    present = list(dict.fromkeys(updates.method))
    methods = list(methods) or method_names() + [m for m in present if m not in method_names()]
    rows = []
    for task, in_task in updates.groupby('task', sort=False):
        for method in methods:
            for role in [r for r in LAYER_ROLES if r in set(in_task.role)]:
                key, n = (task, method, role), int(seeds.get((task, method), 0))
                status = 'not measured' if not n else 'measured' if key in medians.index else 'not changed'
                row = dict(task=task, method=method, role=role, layer=layer[(task, role)], seeds=n,
                           matrices=int(matrices.get(key, 0)), status=status)
                rows.append({**row, **(medians.loc[key].to_dict() if status == 'measured' else {})})
    return pd.DataFrame(rows, columns=['task', 'method', 'role', 'layer', 'seeds', 'matrices', 'status'] + columns)


def format_layer_type_table(table: pd.DataFrame, digits: int = 4) -> pd.DataFrame:
    """`layer_type_table` ready to print: method labels, values rounded to `digits`, and a method not measured on a
    task in one row (layer type 'every') rather than one per layer type, and blanks where there is no value."""
    shown = table.assign(method=table.method.map(method_label))
    missing = shown.status == 'not measured'
    shown.loc[missing, 'role'], shown.loc[missing, 'layer'] = 'every', ''
    shown = shown[~(missing & shown.duplicated(['task', 'method']))].round(digits).reset_index(drop=True)
    return shown.astype(object).where(shown.notna(), '')  # blank, not 'nan', where there is no median


DW_COLUMNS = ('spectral_ratio', 'rank_e50', 'rank_e90', 'rank_e99', 'left_energy_r', 'right_energy_r',
              'left_energy_8', 'right_energy_8', 'left_energy_32', 'right_energy_32', 'amplification')


ADAPTER_NOTE = ('adapters add modules after frozen layers: every target weight is unchanged (dW = 0); the adapters\' '
                'own change is not a change of these weights and is not analysed')


class UpdateBaseline:
    """The pretrained weights of every attention and MLP matrix (on the CPU), kept from before the method, and TOU's
    own starting weights (A_0 B_0), so that a finished run records what it did to each layer (`update_summary`)."""

    def __init__(self, entries, conv1d, family=None, why: Optional[str] = None):
        self.entries, self.conv1d, self.family, self.why, self.start = entries, conv1d, family, why, None

    @classmethod
    def capture(cls, model: nn.Module) -> 'UpdateBaseline':
        """The untouched model's matrices (call before any method changes it)."""
        try:
            entries = [(n, p, w.detach().to('cpu', copy=True)) for n, p, w in layer_matrices(model)]
        except ValueError as e:  # no attention or MLP matrix (a convolutional network): nothing to analyse
            return cls([], [], why=f'not defined: {e}')
        return cls(entries, conv1d_names(model), model_family(model))  # the layout as pretrained, before any method

    def capture_start(self, model: nn.Module, moves_start: bool) -> None:
        """The prepared model's starting weights, kept when the method's preparation moved them away from the
        pretrained ones (`Method.moves_start`: TOU's noise and truncation), so the update is measured from there."""
        if self.entries and moves_start:
            self.start = [w.to('cpu', copy=True) for w in matched_weights(model, self.entries, self.conv1d)]

    def summary(self, model: nn.Module, method: str, ranks: Optional[dict], preset_rank: RankSpec) -> dict:
        """What the trained `model` changed, as a run record keeps it (`update_summary`, plus the rank it used, a
        note and the seconds it took).

        Args:
            model: the trained model (merged or not).
            method: the run's method.
            ranks: the run's TOU ranks (`model.toukit_ranks`), or None when the method has none.
            preset_rank: the rank the analysis uses without `ranks`: the preset's TOU rank.
        """
        if not self.entries:
            return dict(note=self.why)
        t0 = time.perf_counter()
        rank = ranks or preset_rank
        table = update_rows(self.entries, matched_weights(model, self.entries, self.conv1d), self.start, rank=rank,
                            family=self.family)
        out = update_summary(table)
        out['rank'] = 'the run\'s TOU ranks' if ranks else f'{rank} (the preset\'s TOU rank)'
        if method == 'adapter':
            out['note'] = ADAPTER_NOTE
        out['seconds'] = time.perf_counter() - t0
        return out
