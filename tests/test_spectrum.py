import numpy as np
import pytest
import torch

import toukit
from toukit import rank_table, spectrum_table


def test_spectrum_table_vit_rows_and_columns(test_vit):
    table = spectrum_table(test_vit)
    depth = len(test_vit.blocks)
    assert len(table) == 6 * depth  # q, k, v, proj, fc1, fc2 per block
    assert set(table.part.dropna()) == {'q', 'k', 'v'}
    for col in ['name', 'out_features', 'in_features', 'max_rank', 'fro_norm', 'spectral_norm', 'stable_rank',
                'effective_rank', 'rank_e50', 'rank_e90', 'rank_e99', 'singular_values', 'block', 'kind']:
        assert col in table
    names = {n for n, _ in test_vit.named_modules()}
    assert set(table.name) <= names
    row = table[table.name == 'blocks.0.mlp.fc1'].iloc[0]
    w = test_vit.blocks[0].mlp.fc1.weight.detach().double()
    np.testing.assert_allclose(row.singular_values, torch.linalg.svdvals(w).numpy(), rtol=1e-10)
    assert row.fro_norm == pytest.approx(float(torch.linalg.norm(w)), rel=1e-10)
    assert (table.rank_e50 <= table.rank_e90).all() and (table.rank_e90 <= table.rank_e99).all()
    assert (table.rank_e99 <= table.max_rank).all()
    assert set(table.kind) == {'attention', 'mlp'}


def test_spectrum_table_bert_like(tiny_bert):
    table = spectrum_table(tiny_bert, targets='attention')
    assert len(table) == 4 * 2
    assert table.name.str.contains('attention').all()


@pytest.fixture(scope='module')
def minilm():
    return toukit.create_model('minilm', num_classes=5)


def test_minilm_real_spectrum(minilm):
    table = spectrum_table(minilm)
    assert len(table) == 6 * 6
    assert set(table.type) >= {'attention.self.query', 'intermediate.dense', 'output.dense'}
    # pretrained weights are far from low rank, but not white noise either: energy 0.9 needs a real fraction
    assert (table.rank_e90 < table.max_rank).all() and (table.rank_e90 > 10).all()


def test_rank_table_error_matches_truncation(minilm):
    table = spectrum_table(minilm, targets=['layer.0.attention.self.query'])
    ranks = rank_table(table, 0.375)
    assert ranks['rank'].tolist() == [144]
    w = minilm.encoder.encoder.layer[0].attention.self.query.weight.detach().double()
    a, b = toukit.truncated_svd(w, 144)
    assert ranks.relative_error.iloc[0] == pytest.approx(float(torch.linalg.norm(w - a @ b) / torch.linalg.norm(w)),
                                                        rel=1e-8)
    assert ranks.params_factored.iloc[0] == 144 * (384 + 384)
    energy = rank_table(table, 'energy:0.9')
    assert energy.energy_kept.iloc[0] >= 0.9
