"""Tiny random configs of the model families toukit supports (no downloads), with a matching input batch."""
import torch

VOCAB = 100
ARCHITECTURES = {
    # model_type: (config class, model class, config kwargs, kind of input: causal, seq2seq, text, image, image-text)
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
    # decoders
    'gptj': ('GPTJConfig', 'GPTJForCausalLM', dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4),
             'causal'),  # attention and MLP in parallel off one norm
    # multi-query: c_attn is q plus one k and one v head (32 -> 48), so it is not split as q/k/v
    'gpt_bigcode': ('GPTBigCodeConfig', 'GPTBigCodeForCausalLM', dict(n_embd=32, n_layer=2, n_head=4,
                                                                      n_positions=64), 'causal'),
    'falcon': ('FalconConfig', 'FalconForCausalLM', dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
               'causal'),  # every block projection is a FalconLinear (an nn.Linear subclass); multi-query
    'mpt': ('MptConfig', 'MptForCausalLM', dict(d_model=32, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=64),
            'causal'),  # fused Wqkv (q, k, v contiguous: split)
    'codegen': ('CodeGenConfig', 'CodeGenForCausalLM', dict(n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                            rotary_dim=4), 'causal'),  # fused qkv_proj, interleaved
    'phi': ('PhiConfig', 'PhiForCausalLM', dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=4), 'causal'),
    'gemma2': ('Gemma2Config', 'Gemma2ForCausalLM', dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                         num_attention_heads=4, num_key_value_heads=2, head_dim=8),
               'causal'),
    'mixtral': ('MixtralConfig', 'MixtralForCausalLM', dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=4, num_experts_per_tok=2), 'causal'),  # experts (3-d) and router: parameters, no linear
    # its MoE router is Llama4Router, an nn.Linear subclass whose forward returns (scores, logits)
    'llama4_text': ('Llama4TextConfig', 'Llama4ForCausalLM', dict(
        hidden_size=32, intermediate_size=64, intermediate_size_mlp=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=4, pad_token_id=0), 'causal'),
    # no softmax attention (RwkvSelfAttention is time mixing). Its first eval forward rescales output.weight and
    # value.weight in place (by 2 ** (block // rescale_every)): a toukit layer refuses such a write (its weight is
    # formed from factors), so rescaling is off here, as for training
    'rwkv': ('RwkvConfig', 'RwkvForCausalLM', dict(hidden_size=32, attention_hidden_size=32, intermediate_size=64,
                                                   num_hidden_layers=2, context_length=64, rescale_every=0), 'causal'),
    # hybrid: one block class whose mixer is Mamba-2 ('linear_attention'), attention or an MLP
    'nemotron_h': ('NemotronHConfig', 'NemotronHForCausalLM', dict(
        hidden_size=32, intermediate_size=64, layer_types=['linear_attention', 'full_attention', 'mlp'],
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8, mamba_num_heads=4,
        mamba_head_dim=8, ssm_state_size=8, n_groups=1, pad_token_id=0), 'causal'),
    # encoders
    'electra': ('ElectraConfig', 'ElectraForSequenceClassification', dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, embedding_size=16),
                'text'),  # embeddings_project (16 -> 32) outside the blocks
    'deberta': ('DebertaConfig', 'DebertaForSequenceClassification', dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4), 'text'),  # fused in_proj
    'albert': ('AlbertConfig', 'AlbertForSequenceClassification', dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, embedding_size=16),
               'text'),  # one shared layer applied num_hidden_layers times
    # encoder-decoders
    'mt5': ('MT5Config', 'MT5ForConditionalGeneration', dict(d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8),
            'seq2seq'),  # gated-GELU feed-forward, untied head
    # vision
    'beit': ('BeitConfig', 'BeitForImageClassification', dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8,
        use_relative_position_bias=True), 'image'),
    'dinov2': ('Dinov2Config', 'Dinov2ForImageClassification', dict(
        hidden_size=32, mlp_ratio=2, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8),
               'image'),
    # vision-language: a ViT (fused qkv), a Q-Former (self- and cross-attention) and an OPT decoder
    'blip-2': ('Blip2Config', 'Blip2ForConditionalGeneration', dict(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            cross_attention_frequency=1),
        text_config=dict(model_type='opt', hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                         word_embed_proj_dim=32, vocab_size=VOCAB),
        num_query_tokens=4, image_token_index=VOCAB - 1), 'image-text'),
}


def build(model_type: str, seed: int = 0):
    """(a tiny random model of `model_type` in eval mode, an input batch for it)."""
    import transformers
    config_class, model_class, kwargs, kind = ARCHITECTURES[model_type]
    extra = {} if kind in ('image', 'image-text') else dict(vocab_size=VOCAB)  # image-text: in its text_config
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**kwargs, **extra)).eval()
    g = torch.Generator().manual_seed(seed)
    if kind == 'image':
        inputs = dict(pixel_values=torch.randn(2, 3, 32, 32, generator=g))
    elif kind == 'image-text':  # 8 tokens: one placeholder per query token (the image's), then text
        queries, image_token = kwargs['num_query_tokens'], kwargs['image_token_index']
        inputs = dict(pixel_values=torch.randn(2, 3, 32, 32, generator=g),
                      input_ids=torch.cat([torch.full((2, queries), image_token),
                                           torch.randint(3, image_token, (2, 8 - queries), generator=g)], dim=1))
    else:
        inputs = dict(input_ids=torch.randint(3, VOCAB, (2, 8), generator=g))
        if kind == 'seq2seq':
            inputs['decoder_input_ids'] = torch.randint(3, VOCAB, (2, 5), generator=g)
    return model, inputs


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits
