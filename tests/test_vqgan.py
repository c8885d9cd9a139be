"""vqgan.py: the three pixel tokenizers behind one loader; the two pretrained layouts encode and decode
exactly as their official code did on the same weights (fixtures made by tests/make_vq_fixtures.py from the
official modules)."""
import argparse
import os

import pytest
import torch

from make_vq_fixtures import FIXTURES, fixed_weights
from vqgan import LlamaGenVQ, MageVQGAN, VQModel, load_vq, vq_decode, vq_encode


def fixture(name):
    return torch.load(os.path.join(FIXTURES, f"{name}_vq.pt"), weights_only=True)


def official_state_dict(fx):
    sd = fixed_weights(fx["shapes"], fx["seed"])
    sd[fx["codebook_key"]] = fx["codebook"]
    return sd


def write_checkpoint(tmp_path, name, layout):
    """The fixture's weights saved in the layout the project publishes them in."""
    fx = fixture(name)
    path = tmp_path / f"{name}.ckpt"
    torch.save(layout(official_state_dict(fx)), path)
    return str(path), fx


@pytest.mark.parametrize("name, layout, kind", [
    ("mage", lambda sd: {"state_dict": sd}, "mage"),  # MAGE's vqgan_jax_strongaug.ckpt
    ("llamagen", lambda sd: {"model": sd}, "llamagen"),  # LlamaGen's vq_ds16_c2i.pt
    # a training checkpoint
    ("llamagen", lambda sd: {"ema": sd, "args": argparse.Namespace(vq_model="VQ-16")}, "llamagen"),
])
def test_pretrained_layouts_match_official_code(tmp_path, name, layout, kind):
    path, fx = write_checkpoint(tmp_path, name, layout)
    vq, info = load_vq(path, "cpu", grid=fx["grid"])
    assert info["kind"] == kind and info["grid"] == tuple(fx["grid"]) and info["pixel_size"] == 32
    assert info["model_args"]["codes"] == 64
    ids = vq_encode(vq, fx["images"])
    assert torch.equal(ids, fx["ids"])  # the same code for every patch
    pixels = vq.decode(fx["ids"], fx["grid"])
    assert pixels.shape == fx["pixels"].shape
    assert (pixels - fx["pixels"]).abs().max() < 1e-4  # float rounding only
    assert torch.equal(vq_decode(vq, fx["ids"], fx["grid"]), pixels.clamp(-1, 1))


def test_shapes_come_from_the_checkpoint():
    """Every size is read off the weights: the rebuilt model has exactly the official keys and shapes."""
    for name, cls in (("mage", MageVQGAN), ("llamagen", LlamaGenVQ)):
        fx = fixture(name)
        from vqgan import llamagen_args, mage_args
        args = (mage_args if name == "mage" else llamagen_args)(official_state_dict(fx))
        ours = {k: list(v.shape) for k, v in cls(**args).state_dict().items()}
        theirs = {k: v for k, v in fx["shapes"].items() if not k.endswith("codebook_used")}
        assert ours == theirs


def test_mage_differs_from_a_plain_taming_block():
    """MAGE's residual shortcut maps the block's output, not its input: swapping that changes the pixels, so
    the fixture test above would catch a CompVis-style reimplementation."""
    fx = fixture("mage")
    from vqgan import mage_args
    sd = official_state_dict(fx)
    vq = MageVQGAN(**mage_args(sd))
    vq.load_state_dict(sd)
    for m in vq.modules():
        if hasattr(m, "mage_shortcut") and hasattr(m, "nin_shortcut"):
            m.mage_shortcut = False
            m.nin_shortcut = torch.nn.Conv2d(m.conv1.in_channels, m.conv2.out_channels, 1, bias=False)
    with torch.no_grad():
        assert (vq.decode(fx["ids"], fx["grid"]) - fx["pixels"]).abs().max() > 1e-2


def test_ours_through_the_same_loader(tmp_path):
    vq = VQModel(levels=2, channels=16, codes=32, code_dim=8)
    torch.save(dict(model=vq.state_dict(), model_args=dict(levels=2, channels=16, codes=32, code_dim=8),
                    grid=(4, 4), pixel_size=16, fingerprint="abc"), tmp_path / "vq.pt")
    loaded, info = load_vq(str(tmp_path / "vq.pt"), "cpu", grid=(4, 4))
    assert info["kind"] == "ours" and info["fingerprint"] == "abc"
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(vq_encode(loaded, x), vq_encode(vq.eval(), x))
    with pytest.raises(SystemExit, match=r"has a \(4, 4\) latent grid but the DiGIT tokens are \(8, 8\)"):
        load_vq(str(tmp_path / "vq.pt"), "cpu", grid=(8, 8))


def test_bad_checkpoints_are_one_line_errors(tmp_path):
    path, fx = write_checkpoint(tmp_path, "mage", lambda sd: {"state_dict": sd})
    with pytest.raises(SystemExit,
                       match=r"gives a 4x4 latent grid at 16 px but the DiGIT grid is 8x8: use --pixel-size "
                             r"32"):
        load_vq(path, "cpu", grid=(8, 8), pixel_size=16)
    torch.save({"state_dict": {"foo.weight": torch.zeros(1), "bar": torch.zeros(2)}}, tmp_path / "other.ckpt")
    with pytest.raises(SystemExit,
                       match=r"none of vq.pt, MAGE's VQGAN, LlamaGen's VQ \(keys found: \['foo.weight', "
                             r"'bar'\]\)"):
        load_vq(str(tmp_path / "other.ckpt"), "cpu")
    sd = official_state_dict(fx)
    # CompVis taming has quant_conv and attention: not MAGE's
    sd["quant_conv.weight"] = torch.zeros(16, 16, 1, 1)
    sd["encoder.mid.attn_1.q.weight"] = torch.zeros(64, 64, 1, 1)
    torch.save({"state_dict": sd}, tmp_path / "compvis.ckpt")
    with pytest.raises(SystemExit, match="looks like a taming VQGAN but not MAGE's nor LlamaGen's layout"):
        load_vq(str(tmp_path / "compvis.ckpt"), "cpu")
    sd = official_state_dict(fx)
    sd["encoder.conv_out.weight"] = torch.zeros(16, 32, 1, 1)  # a wrong width
    torch.save({"state_dict": sd}, tmp_path / "bad.ckpt")
    with pytest.raises(SystemExit, match="a mage layout whose weights do not fit it"):
        load_vq(str(tmp_path / "bad.ckpt"), "cpu")
    data = open(path, "rb").read()
    open(tmp_path / "truncated.ckpt", "wb").write(data[: len(data) // 2])
    with pytest.raises(SystemExit, match="cannot be read as a checkpoint"):
        load_vq(str(tmp_path / "truncated.ckpt"), "cpu")
    with pytest.raises(SystemExit, match="is a folder"):
        load_vq(str(tmp_path), "cpu")
    with pytest.raises(SystemExit, match="not found"):
        load_vq(str(tmp_path / "missing.ckpt"), "cpu")


def test_no_unrestricted_unpickling(tmp_path):
    """weights_only stays on: a checkpoint holding an arbitrary object is refused (only argparse.Namespace is
    allowed)."""
    path, fx = write_checkpoint(tmp_path, "llamagen", lambda sd: {"model": sd, "extra": torch.optim.SGD})
    with pytest.raises(SystemExit, match="cannot be read as a checkpoint"):
        load_vq(path, "cpu")
