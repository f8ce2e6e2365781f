import pytest
import torch
from torch import nn


class TwoLayerMLP(nn.Module):
    """A model of no known family: every nn.Linear but the head is a target."""

    def __init__(self, d_in=24, d_hidden=40, n_classes=5):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_hidden)
        self.head = nn.Linear(d_hidden, n_classes)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return TwoLayerMLP()


@pytest.fixture
def test_vit():
    import timm
    torch.manual_seed(0)
    return timm.create_model('test_vit', num_classes=7).eval()


@pytest.fixture
def tiny_bert():
    import toukit
    return toukit.create_model('tiny-bert', num_classes=3, seed=0).eval()


def bert_inputs(batch=2, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, length // 2:] = 0
    return dict(input_ids=ids, attention_mask=mask)


def calibration_for(method: str, inputs, labels=None) -> dict:
    """The `calibration` option a data-driven method needs (EVA: a batch of inputs; LoRA-GA: (inputs, labels)), as
    keyword arguments for `apply_method`; {} for every other method."""
    import toukit
    data = toukit.METHODS[method].data
    if not data:
        return {}
    if labels is None:
        first = next(iter(inputs.values())) if isinstance(inputs, dict) else inputs
        labels = torch.arange(first.shape[0]) % 2
    return dict(calibration=[inputs] if data == 'inputs' else [(inputs, labels)])
