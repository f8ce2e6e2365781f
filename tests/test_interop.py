"""A TOU-prepared model in the field's own tools: transformers' Trainer, accelerate, save/from_pretrained, timm."""
import pytest
import torch

import toukit
from architectures import build, logits


class _Sequences(torch.utils.data.Dataset):
    def __init__(self, n=16, length=8, vocab=100):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, vocab, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return dict(input_ids=self.ids[i], labels=self.ids[i])


def test_trainer_trains_only_b_and_the_intended_parameters(tmp_path):
    from transformers import Trainer, TrainingArguments
    model, _ = build('llama')
    toukit.apply_method(model, 'tou_frozen_ffn', rank=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=8, learning_rate=1e-2,
                             logging_steps=1, save_strategy='no', report_to=[], use_cpu=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=_Sequences())
    trainer.train()
    losses = [h['loss'] for h in trainer.state.log_history if 'loss' in h]
    assert losses[-1] < losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed == {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.endswith('tou_A') for n in changed)
    assert any('self_attn' in n and n.endswith('tou_B') for n in changed)
    assert not any('mlp' in n for n in changed)  # frozen FFN


def test_accelerate_prepares_and_steps_a_tou_model():
    from accelerate import Accelerator
    model, inputs = build('gpt2')
    toukit.apply_tou(model, rank=4)
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    b0 = model.transformer.h[0].attn.c_attn.tou_B.detach().clone()
    model.train()
    loss = model(input_ids=inputs['input_ids'], labels=inputs['input_ids']).loss
    accelerator.backward(loss)
    optimizer.step()
    assert not torch.equal(model.transformer.h[0].attn.c_attn.tou_B, b0)
    toukit.merge(accelerator.unwrap_model(model))


@pytest.mark.parametrize('model_type', ['gpt2', 'llama', 't5'])
def test_merged_model_round_trips_save_pretrained(model_type, tmp_path):
    model, inputs = build(model_type)
    toukit.apply_tou(model, rank=0.5)
    with torch.no_grad():  # pretend training moved B
        for m in model.modules():
            if isinstance(m, toukit.FactorizedLinear):
                m.tou_B.add_(0.01)
    expected = logits(model, inputs)
    toukit.merge(model)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(loaded, inputs), expected, rtol=1e-4, atol=1e-5)


def test_timm_merged_model_loads_through_pretrained_cfg_overlay(tmp_path):
    import timm
    from safetensors.torch import save_model
    torch.manual_seed(0)
    model = timm.create_model('test_vit', num_classes=5).eval()
    toukit.apply_tou(model, rank=0.5)
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        expected = model(x)
    toukit.merge(model)
    save_model(model, str(tmp_path / 'merged.safetensors'))
    loaded = timm.create_model('test_vit', num_classes=5, pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(tmp_path / 'merged.safetensors'),
                                                                   num_classes=5)).eval()  # keep our head
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=1e-4, atol=1e-5)


def test_create_model_reloads_a_fine_tuned_timm_checkpoint_with_its_head(tmp_path):
    from safetensors.torch import save_model
    torch.manual_seed(0)
    model = toukit.create_model('test_vit', num_classes=5, pretrained=False).eval()
    toukit.apply_tou(model, rank=0.5)
    toukit.merge(model)
    save_model(model, str(tmp_path / 'tuned.safetensors'))
    torch.save(model.state_dict(), tmp_path / 'tuned.pth')
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        expected = model(x)
        for name in ('tuned.safetensors', 'tuned.pth'):
            loaded = toukit.create_model('test_vit', num_classes=5, weights=str(tmp_path / name)).eval()
            torch.testing.assert_close(loaded(x), expected, rtol=1e-4, atol=1e-5)
