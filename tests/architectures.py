"""Tiny random configs of the model families toukit supports (no downloads), with a matching input batch."""
import torch

ARCHITECTURES = {
    # model_type: (config class, model class, config kwargs, kind of input)
    'llama': ('LlamaConfig', 'LlamaForCausalLM', dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                      num_attention_heads=4, num_key_value_heads=4), 'causal'),
    'mistral': ('MistralConfig', 'MistralForCausalLM', dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                            num_attention_heads=4, num_key_value_heads=2), 'causal'),
    'qwen2': ('Qwen2Config', 'Qwen2ForCausalLM', dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                      num_attention_heads=4, num_key_value_heads=2), 'causal'),
    'gpt2': ('GPT2Config', 'GPT2LMHeadModel', dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                                                   eos_token_id=0), 'causal'),
    'gpt_neox': ('GPTNeoXConfig', 'GPTNeoXForCausalLM', dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                             num_attention_heads=4), 'causal'),
    'opt': ('OPTConfig', 'OPTForCausalLM', dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                                word_embed_proj_dim=32), 'causal'),
    'bloom': ('BloomConfig', 'BloomForCausalLM', dict(hidden_size=32, n_layer=2, n_head=4), 'causal'),
    't5': ('T5Config', 'T5ForConditionalGeneration', dict(d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8),
           'seq2seq'),
    'bart': ('BartConfig', 'BartForConditionalGeneration', dict(
        d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4), 'seq2seq'),
    'distilbert': ('DistilBertConfig', 'DistilBertForSequenceClassification', dict(dim=32, hidden_dim=64, n_layers=2,
                                                                                   n_heads=4), 'text'),
    'bert': ('BertConfig', 'BertForSequenceClassification', dict(hidden_size=32, intermediate_size=64,
                                                                 num_hidden_layers=2, num_attention_heads=4), 'text'),
    'roberta': ('RobertaConfig', 'RobertaForSequenceClassification', dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4), 'text'),
    'deberta-v2': ('DebertaV2Config', 'DebertaV2ForSequenceClassification', dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4), 'text'),
    'vit': ('ViTConfig', 'ViTForImageClassification', dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                           num_attention_heads=4, image_size=32, patch_size=8),
            'image'),
    'deit': ('DeiTConfig', 'DeiTForImageClassification', dict(hidden_size=32, intermediate_size=64,
                                                              num_hidden_layers=2, num_attention_heads=4,
                                                              image_size=32, patch_size=8), 'image'),
    'swin': ('SwinConfig', 'SwinForImageClassification', dict(embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                                                              image_size=32, patch_size=4, window_size=4), 'image'),
}
VOCAB = 100


def build(model_type: str, seed: int = 0):
    """(a tiny random model of `model_type` in eval mode, an input batch for it)."""
    import transformers
    config_class, model_class, kwargs, kind = ARCHITECTURES[model_type]
    extra = {} if kind == 'image' else dict(vocab_size=VOCAB)
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**kwargs, **extra)).eval()
    g = torch.Generator().manual_seed(seed)
    if kind == 'image':
        inputs = dict(pixel_values=torch.randn(2, 3, 32, 32, generator=g))
    else:
        inputs = dict(input_ids=torch.randint(3, VOCAB, (2, 8), generator=g))
        if kind == 'seq2seq':
            inputs['decoder_input_ids'] = torch.randint(3, VOCAB, (2, 5), generator=g)
    return model, inputs


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits
