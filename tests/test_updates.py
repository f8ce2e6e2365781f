"""The spectrum of the update: designed updates give the designed answers; runs record a summary; bad input is named."""
import copy
import math

import pandas as pd
import pytest
import torch
from torch import nn

import toukit
from toukit import train
from toukit.updates import update_summary


class Net(nn.Module):
    def __init__(self, out_f=200, in_f=120):
        super().__init__()
        self.proj = nn.Linear(in_f, out_f, bias=False)
        self.head = nn.Linear(out_f, 3)

    def forward(self, x):
        return self.head(self.proj(x))


def _pair(update_fn, seed=0):
    torch.manual_seed(seed)
    before = Net().double()
    after = copy.deepcopy(before)
    with torch.no_grad():
        after.proj.weight.copy_(update_fn(before.proj.weight.detach().clone()))
    return before, after


def _row(before, after, rank=20, **kw):
    table = toukit.update_table(before, after, targets=['proj'], rank=rank, **kw)
    assert len(table) == 1
    return table.iloc[0]


def test_a_rank_k_update_inside_the_top_r_subspace():
    k, r = 3, 20
    g = torch.Generator().manual_seed(1)

    def update(w):
        u, _, _ = torch.linalg.svd(w)
        return w + u[:, :r] @ torch.randn(r, k, generator=g, dtype=w.dtype) @ torch.randn(k, w.shape[1], generator=g,
                                                                                             dtype=w.dtype)
    row = _row(*_pair(update), rank=r)
    assert row.rank_e99 == k and row.rank_e50 <= k and 1 <= row.stable_rank <= k
    assert row.left_energy_r == pytest.approx(1.0, abs=1e-5)  # float32 singular vectors
    assert row.random_left_r == pytest.approx(r / 200) and row.random_right_r == pytest.approx(r / 120)


def test_an_update_in_a_random_subspace_holds_about_r_over_out():
    r = 20
    g = torch.Generator().manual_seed(2)
    shares = []
    for seed in range(5):
        row = _row(*_pair(lambda w: w + torch.randn(w.shape[0], 5, generator=g, dtype=w.dtype) @ torch.randn(
            5, w.shape[1], generator=g, dtype=w.dtype), seed=seed), rank=r)
        shares.append(row.left_energy_r)
    assert abs(sum(shares) / len(shares) - r / 200) < 0.04


def test_unrotated_and_orthogonal_subspaces():
    row = _row(*_pair(lambda w: 3 * w))  # scaling keeps every singular vector
    assert row.left_similarity_1 == pytest.approx(1.0, abs=1e-5) and row.right_similarity_8 == pytest.approx(1.0, abs=1e-5)
    assert row.left_similarity_r == pytest.approx(1.0, abs=1e-5)

    def rotate(w):  # W_1's top 8 left vectors orthogonal to W_0's top 8
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u = torch.cat([u[:, 8:16], u[:, :8], u[:, 16:]], dim=1)
        s = torch.cat([s[:8] * 10, s[8:]])
        return (u * s) @ vh
    row = _row(*_pair(rotate))
    assert row.left_similarity_8 < 1e-6 and row.left_similarity_1 < 1e-6


def test_an_update_of_zero_is_reported_as_zero():
    row = _row(*_pair(lambda w: w))
    numbers = {k: v for k, v in row.items() if isinstance(v, float)}
    assert not any(math.isnan(v) for v in numbers.values())
    for key in ('relative_update', 'spectral_ratio', 'stable_rank', 'effective_rank', 'left_energy_r',
                'right_energy_8', 'amplification'):
        assert row[key] == 0.0, key
    assert row.rank_e90 == 0 and row.left_similarity_8 == pytest.approx(1.0)


def test_tou_unmerged_layers_and_their_own_start(test_vit):
    before = copy.deepcopy(test_vit)
    toukit.apply_tou(test_vit, rank=8, noise_scale=1e-4)  # test_vit's A is ~0.04 per entry: small noise on it
    start = copy.deepcopy(test_vit)
    with torch.no_grad():
        for layer in test_vit.modules():
            if isinstance(layer, toukit.FactorizedLinear):
                layer.tou_B.add_(0.01 * torch.randn_like(layer.tou_B))
    table = toukit.update_table(before, test_vit, rank=test_vit.toukit_ranks, start=start)
    assert len(table) == len(list(toukit.layer_matrices(before)))  # q, k and v apart
    # TOU's own update A (B_1 - B_0) lies in span(A) = W_0's top-r left subspace up to the noise on A
    assert table.start_left_energy_r.min() > 0.99
    assert (table.start_relative_update < table.relative_update).all()  # the truncation is part of the full update
    merged = toukit.merge(copy.deepcopy(test_vit))
    again = toukit.update_table(before, merged, rank=test_vit.toukit_ranks, start=start)
    assert again.relative_update.tolist() == pytest.approx(table.relative_update.tolist(), rel=1e-5)


def test_bad_input_names_the_layer(test_vit, mlp):
    other = copy.deepcopy(test_vit)
    with pytest.raises(ValueError, match='different architectures: VisionTransformer and TwoLayerMLP'):
        toukit.update_table(test_vit, mlp)
    state = other.state_dict()
    del state['blocks.1.mlp.fc2.weight']
    with pytest.raises(ValueError, match="blocks.1.mlp.fc2: the state dict has no 'blocks.1.mlp.fc2.weight'"):
        toukit.update_table(test_vit, state)
    state = other.state_dict()
    state['blocks.0.mlp.fc1.weight'] = state['blocks.0.mlp.fc1.weight'][:-1]
    with pytest.raises(ValueError, match=r'blocks.0.mlp.fc1: the fine-tuned weight has shape'):
        toukit.update_table(test_vit, state)
    toukit.apply_method(other, 'lora', rank=2)
    with pytest.raises(ValueError, match='merge the model first|no such layer'):
        toukit.update_table(test_vit, other)


def test_a_training_run_records_the_update_summary(tmp_path):
    record = train.run(method='tou', preset='test', epochs=1, max_steps_per_epoch=2, results_dir=str(tmp_path),
                       progress=False)
    summary = record['updates']
    assert summary['layers'] and set(toukit.updates.COLUMNS) == set(summary['columns'])
    layer = summary['layers'][0]
    assert layer['relative_update'] > 0 and 'start_left_energy_r' in layer and len(layer['singular_values']) <= 8
    assert summary['seconds'] < 30
    adapter = train.run(method='adapter', preset='test', epochs=1, max_steps_per_epoch=1,
                        results_dir=str(tmp_path), progress=False)
    layers = adapter['updates']['layers']
    assert 'dW = 0' in adapter['updates']['note'] and all(r['relative_update'] == 0 for r in layers)
    assert {r['kind'] for r in layers} == {'attention', 'mlp'}  # the wrapped layers' kinds too, as pretrained


def test_the_summary_is_json_ready_and_small():
    import json
    row_table = toukit.update_table(*_pair(lambda w: w + 0.1), targets=['proj'])
    text = json.dumps(update_summary(row_table))
    assert 'NaN' not in text and len(text) < 10_000


def test_the_effective_rank_of_a_low_rank_update_of_float32_weights_is_its_rank():
    """The update's spectrum is computed exactly: float32 Gram eigenvalues would lift its zero singular values."""
    from toukit.updates import update_rows
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(384, 384, generator=g)
    dw = torch.randn(384, 8, generator=g) @ torch.randn(8, 384, generator=g) * 1e-3
    row = update_rows([('x', None, w0)], [w0 + dw]).iloc[0]
    assert row.rank_e99 <= 8 and row.effective_rank < 8.05


def test_a_partial_rank_pattern_and_a_large_fixed_rank_cover_every_layer(test_vit):
    before = copy.deepcopy(test_vit)
    with torch.no_grad():
        test_vit.blocks[0].mlp.fc1.weight.add_(0.01)
    table = toukit.update_table(before, test_vit, rank={'blocks.0.attn.qkv': 4})
    assert table.set_index('name').loc['blocks.0.mlp.fc1', 'rank'] == round(0.375 * 64)
    assert (toukit.update_table(before, test_vit, rank=10_000)['rank'] == 64).all()  # the whole subspace


def test_a_run_on_some_targets_records_every_layer(tmp_path):
    record = train.run(method='tou', preset='test', targets='attention', epochs=1, max_steps_per_epoch=1,
                       results_dir=str(tmp_path), progress=False)
    layers = record['updates']['layers']
    assert record['status'] == 'ok' and len(layers) == len(list(toukit.layer_matrices(
        toukit.create_model('test_vit', 4, pretrained=False))))
    assert {r['kind'] for r in layers if r['relative_update'] > 0} >= {'attention'}


def test_own_updates_show_tou_from_its_start_and_drop_unchanged_layers():
    from toukit.updates import own_updates
    table = pd.DataFrame([
        dict(method='tou', relative_update=0.4, left_energy_r=0.01, right_energy_r=0.01, start_relative_update=0.02,
             start_left_energy_r=1.0, start_right_energy_r=0.3),
        dict(method='tou', relative_update=0.4, left_energy_r=0.01, right_energy_r=0.01, start_relative_update=0.02,
             start_left_energy_r=1.0, start_right_energy_r=None),
        dict(method='lora', relative_update=0.0, left_energy_r=0.0, right_energy_r=0.0),
        dict(method='ft', relative_update=0.01, left_energy_r=0.37, right_energy_r=0.4)])
    own = own_updates(table)
    assert own.method.tolist() == ['tou', 'tou', 'ft']
    assert own.left_energy_r.tolist() == [1.0, 1.0, 0.37] and own.relative_update.tolist() == [0.02, 0.02, 0.01]
    assert own.right_energy_r.iloc[0] == 0.3 and pd.isna(own.right_energy_r.iloc[1])  # no twin recorded: not shown


def _layers(block_names, kinds, out_in, parts=None, prefix='encoder.layer', blocks=2, **values):
    """A made-up record's update rows: per block, each layer's name, type, kind and shape, and the given values
    (a callable of the type gives a value per type)."""
    rows = []
    for b in range(blocks):
        for short, kind, (out_f, in_f) in zip(block_names, kinds, out_in):
            for part in (parts or {}).get(short, [None]):
                layer_type = f'{short}[{part}]' if part else short
                row = dict(name=f'{prefix}.{b}.{short}', type=layer_type, block=b, kind=kind, out_features=out_f,
                           in_features=in_f, random_left_r=96 / out_f, random_right_r=96 / in_f,
                           **{k: v(layer_type) if callable(v) else v for k, v in values.items()})
                rows.append(dict(row, part=part) if part else row)
    return rows


def _record(method, seed, layers):
    return {'run': {'config': {'seed': seed, 'lr': 1e-3, 'method': method}}, 'updates': {'layers': layers}}


BERT = (['attention.self.query', 'attention.self.key', 'attention.self.value', 'attention.output.dense',
         'intermediate.dense', 'output.dense'], ['attention'] * 4 + ['mlp'] * 2,
        [(256, 256)] * 4 + [(1024, 256), (256, 1024)])


def test_layer_roles_of_bert_and_of_a_fused_qkv_vit():
    from toukit.updates import layer_roles, records_updates
    bert = records_updates({'ft': [_record('ft', 0, _layers(*BERT, relative_update=0.1))]})
    assert layer_roles(bert).tolist() == ['q', 'k', 'v', 'attention output', 'mlp in', 'mlp out'] * 2
    vit = _layers(['attn.qkv', 'attn.proj', 'mlp.fc1', 'mlp.fc2'], ['attention'] * 2 + ['mlp'] * 2,
                  [(256, 256), (256, 256), (1024, 256), (256, 1024)], parts={'attn.qkv': ['q', 'k', 'v']},
                  prefix='blocks', relative_update=0.1)
    vit = records_updates({'ft': [_record('ft', 0, vit)]})
    assert layer_roles(vit).tolist() == ['q', 'k', 'v', 'attention output', 'mlp in', 'mlp out'] * 2
    # two tasks whose models share the blocks' path but name their layers otherwise (BERT and an MPNet-like model)
    other = (['attention.attn.q', 'attention.attn.k', 'attention.attn.v', 'attention.attn.o'] + BERT[0][4:],) + BERT[1:]
    both = pd.concat([bert.assign(task='a'),
                      records_updates({'ft': [_record('ft', 0, _layers(*other, relative_update=0.1))]}).assign(task='b')],
                     ignore_index=True)
    assert layer_roles(both).tolist() == ['q', 'k', 'v', 'attention output', 'mlp in', 'mlp out'] * 4


def test_layer_type_table_splits_mlp_in_from_mlp_out_and_says_what_is_missing():
    from toukit.updates import format_layer_type_table, layer_type_table, records_updates
    energy = {'attention.self.query': 0.5, 'attention.self.key': 0.4, 'attention.self.value': 0.3,
              'attention.output.dense': 0.2, 'intermediate.dense': 0.1, 'output.dense': 0.6}
    records = {
        'ft': [_record('ft', s, _layers(*BERT, relative_update=0.01 * (s + 1), left_energy_r=energy.get))
               for s in (0, 1)],
        'lora': [_record('lora', 0, _layers(*BERT, left_energy_r=0.4, relative_update=lambda t: 0.0 if t in (
            'intermediate.dense', 'output.dense') else 0.05))],
        'tou': [_record('tou', 0, _layers(*BERT, relative_update=0.4, left_energy_r=0.01, start_relative_update=0.02,
                                          start_left_energy_r=1.0))]}
    table = layer_type_table(records_updates(records).assign(task='text'))
    rows = table.set_index(['method', 'role'])
    assert rows.loc['ft'].index.tolist() == ['q', 'k', 'v', 'attention output', 'mlp in', 'mlp out']
    assert rows.loc['ft'].left_energy_r.tolist() == [0.5, 0.4, 0.3, 0.2, 0.1, 0.6]
    assert rows.loc[('ft', 'q'), 'relative_update'] == pytest.approx(0.015)  # median over matrices and seeds
    assert (rows.loc['ft'].seeds == 2).all() and (rows.loc['ft'].matrices == 2).all()
    # the random subspace's share per layer type: r / out is 96 / 1024 for MLP in and 96 / 256 for MLP out
    assert rows.loc[('ft', 'mlp in'), 'random_left_r'] == 96 / 1024
    assert rows.loc[('ft', 'mlp out'), 'random_left_r'] == rows.loc[('ft', 'q'), 'random_left_r'] == 96 / 256
    assert rows.loc[('ft', 'mlp in'), 'layer'] == 'intermediate.dense'
    assert rows.loc[('lora', 'mlp out'), 'status'] == 'not changed' and pd.isna(rows.loc[('lora', 'mlp out'),
                                                                                        'left_energy_r'])
    assert rows.loc[('lora', 'q'), 'status'] == 'measured'
    assert rows.loc[('tou', 'q'), 'left_energy_r'] == 1.0  # its own update, from A_0 B_0
    assert (rows.loc['dora'].status == 'not measured').all() and (rows.loc['dora'].seeds == 0).all()
    assert table.method.tolist().index('ft') < table.method.tolist().index('lora')  # the registry's order
    shown = format_layer_type_table(table)
    assert shown[shown.method == 'DoRA'][['role', 'status']].values.tolist() == [['every', 'not measured']]
    assert shown.set_index(['method', 'role']).loc[('LoRA', 'mlp out'), 'left_energy_r'] == ''  # blank, not nan
    from_w0 = layer_type_table(records_updates(records), own=False).set_index(['method', 'role'])
    assert from_w0.loc[('tou', 'q'), 'left_energy_r'] == 0.01
    assert from_w0.loc[('lora', 'mlp in'), 'status'] == 'measured'
