"""Run by tests/test_fsdp.py under torchrun: TOU under FSDP2 (fully_shard) on CPU ranks, then merge on rank 0."""
import sys

import timm
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard

import toukit


def build():
    torch.manual_seed(0)
    model = timm.create_model('test_vit', num_classes=4)
    toukit.apply_method(model, 'tou', rank=8)
    return model


def train(model, steps=3):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 3, 160, 160, generator=g), torch.tensor([0, 1, 2, 3])
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


if __name__ == '__main__':
    dist.init_process_group('gloo')
    model = build()
    for block in model.blocks:  # each block's frozen A and trainable B are sharded together
        fully_shard(block)
    fully_shard(model)
    losses = train(model)
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        merged = build()
        merged.load_state_dict(state)
        toukit.merge(merged)
        torch.save(dict(losses=losses, merged=merged.state_dict()), sys.argv[1])
    dist.destroy_process_group()
