"""What the task adds to a pretrained backbone (its head) trains under every method, decided from the module tree."""
import pytest
import torch
from torch import nn

import toukit
from toukit import train
from architectures import build
from conftest import calibration_for

METHODS = toukit.method_names()
OPTIONS = dict(tou=dict(rank=4), tou_frozen_ffn=dict(rank=4), tou_residual=dict(rank=4), svfit=dict(rank=2),
               delora=dict(rank=2), adapter=dict(width=2),
               **{m: dict(rank=2) for m in ('lora', 'pissa', 'dora', 'mica', 'olora', 'eva', 'loraga')})


def _trains_whole(model, name):
    return all(p.requires_grad for p in model.get_submodule(name).parameters())


@pytest.mark.parametrize('method', METHODS)
def test_distilbert_pre_classifier_trains_under_every_method(method):
    model, inputs = build('distilbert')
    assert toukit.new_modules(model) == ['pre_classifier', 'classifier']
    toukit.apply_method(model, method, **OPTIONS.get(method, {}), **calibration_for(method, inputs))
    assert model.toukit_new_modules == ['pre_classifier', 'classifier']
    assert _trains_whole(model, 'pre_classifier') and _trains_whole(model, 'classifier')


class OddlyNamedHead(nn.Module):
    """A model a user built: a pretrained encoder and a head of no conventional name."""

    def __init__(self):
        super().__init__()
        from transformers import BertConfig, BertModel
        torch.manual_seed(0)
        self.backbone = BertModel(BertConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4), add_pooling_layer=False)
        self.sentiment_projection = nn.Sequential(nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 2))

    def forward(self, input_ids):
        return self.sentiment_projection(self.backbone(input_ids=input_ids).last_hidden_state[:, 0])


@pytest.mark.parametrize('method', METHODS)
def test_a_head_of_any_name_trains_under_every_method(method):
    model = OddlyNamedHead()
    assert toukit.new_modules(model) == ['sentiment_projection']
    assert not set(toukit.find_targets(model)) & {'sentiment_projection.0', 'sentiment_projection.2'}
    ids = torch.randint(3, 100, (2, 6))
    toukit.apply_method(model, method, **OPTIONS.get(method, {}), **calibration_for(method, dict(input_ids=ids)))
    assert _trains_whole(model, 'sentiment_projection')
    model(ids)


@pytest.mark.parametrize('model_type,expected', [
    ('bert', ['classifier']), ('roberta', ['classifier']), ('llama', []), ('gpt2', []), ('t5', []),
    ('vit', ['classifier']), ('swin', ['classifier'])])
def test_pretrained_output_embeddings_are_no_new_head(model_type, expected):
    model, _ = build(model_type)
    assert toukit.new_modules(model) == expected  # an LM head is the pretrained output embedding


def test_timm_head_and_a_plain_model_head(test_vit, mlp):
    assert toukit.new_modules(test_vit) == ['head']
    assert toukit.new_modules(mlp) == ['head']  # no backbone known: the last dense layer


def test_the_run_record_lists_the_head_that_trained(tmp_path):
    record = train.run(method='lora', preset='test', epochs=1, max_steps_per_epoch=1, results_dir=str(tmp_path),
                       progress=False)
    assert record['new_modules'] == ['head']


@pytest.mark.parametrize('model_class', ['BertForMaskedLM', 'BertForPreTraining'])
def test_a_pretrained_language_modelling_head_is_no_new_module(model_class):
    import transformers
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(transformers.BertConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4))
    assert toukit.new_modules(model) == []  # cls.predictions.transform, cls.seq_relationship are pretrained


def test_what_a_checkpoint_lacked_is_new_when_loaded(tmp_path):
    """A masked-LM checkpoint has no pooler and no classifier: both are new in a sequence classifier."""
    import transformers
    from transformers import AutoTokenizer
    from toukit.models import minilm_path
    torch.manual_seed(0)
    transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4)).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(tmp_path)
    model = toukit.create_model(str(tmp_path), num_classes=3)
    assert toukit.new_modules(model) == ['model.bert.pooler.dense', 'model.classifier']
    toukit.apply_method(model, 'lora', rank=2)
    assert _trains_whole(model, 'model.bert.pooler') and _trains_whole(model, 'model.classifier')
