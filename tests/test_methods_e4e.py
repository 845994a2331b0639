"""e4e's Encoder4Editing: the released checkpoint's exact layout, the loader (released file as is, strict, weights
only), forward equality after loading, and e4e's input (FFHQ crop, white background, 256 px, [-1, 1])."""

from __future__ import annotations

import argparse

import pytest
import torch

from idforge.methods.e4e import E4E, Encoder4Editing, e4e_input, load_e4e, read_e4e_checkpoint
from idforge.methods.testing import write_random_e4e_checkpoint

# Shapes from the released checkpoint's layout (e4e psp_encoders.py / helpers.py; facts sheet "Encoder keys").
RELEASED_SHAPES = {
    "input_layer.0.weight": (64, 3, 3, 3),
    "input_layer.2.weight": (64,),
    "body.0.res_layer.1.weight": (64, 64, 3, 3),
    "body.0.res_layer.5.fc1.weight": (4, 64, 1, 1),
    "body.3.shortcut_layer.0.weight": (128, 64, 1, 1),
    "body.3.res_layer.0.weight": (64,),
    "body.6.res_layer.3.weight": (128, 128, 3, 3),
    "body.7.shortcut_layer.1.running_var": (256,),
    "body.20.res_layer.5.fc2.weight": (256, 16, 1, 1),
    "body.21.shortcut_layer.0.weight": (512, 256, 1, 1),
    "body.23.res_layer.4.weight": (512,),
    "styles.0.convs.6.weight": (512, 512, 3, 3),
    "styles.6.convs.8.bias": (512,),
    "styles.17.convs.10.weight": (512, 512, 3, 3),
    "styles.17.linear.weight": (512, 512),
    "latlayer1.weight": (512, 256, 1, 1),
    "latlayer2.weight": (512, 128, 1, 1),
}


def _meta_encoder(width: int = 64) -> Encoder4Editing:
    with torch.device("meta"):
        return Encoder4Editing(width)


def test_released_layout_keys_shapes_and_counts():
    enc = _meta_encoder()
    sd = enc.state_dict()
    assert len(sd) == 621
    assert sum(p.numel() for p in enc.parameters()) == 267_136_704  # ~267.1 M (facts sheet)
    for key, shape in RELEASED_SHAPES.items():
        assert tuple(sd[key].shape) == shape, key
    # 4 / 5 / 6 stride-2 convs for the 16 / 32 / 64 px levels (coarse 0-2, middle 3-6, fine 7-17)
    convs = [sum(1 for k in sd if k.startswith(f"styles.{i}.convs.") and k.endswith(".weight")) for i in range(18)]
    assert convs == [4] * 3 + [5] * 4 + [6] * 11
    assert not any(k.startswith("body.0.shortcut_layer") for k in sd)  # MaxPool shortcut: no parameters
    assert {k.split(".")[1] for k in sd if ".shortcut_layer." in k} == {"3", "7", "21"}


def test_feature_taps_and_output_at_256_px():
    enc = _meta_encoder()
    seen = {}
    for i in (6, 20, 23):
        enc.body[i].register_forward_hook(lambda _m, _i, out, i=i: seen.__setitem__(i, tuple(out.shape[1:])))
    out = enc(torch.empty(2, 3, 256, 256, device="meta"))
    assert seen == {6: (128, 64, 64), 20: (256, 32, 32), 23: (512, 16, 16)}
    assert tuple(out.shape) == (2, 18, 512)


def test_w0_is_broadcast_and_rows_add_their_own_delta(one_torch_thread):
    torch.manual_seed(0)
    enc = Encoder4Editing(16).eval()
    with torch.no_grad():
        for i in range(1, 18):  # every delta off: all 18 rows are w0
            enc.styles[i].linear.weight.zero_()
            enc.styles[i].linear.bias.zero_()
        x = torch.rand(1, 3, 64, 64) * 2 - 1
        rows = enc(x)
        assert torch.equal(rows, rows[:, :1].expand(-1, 18, -1))
        enc.styles[9].linear.bias.fill_(1.0)  # one fine delta moves only its row
        moved = enc(x)
    changed = (moved - rows).abs().amax(-1)[0]
    assert changed.nonzero().flatten().tolist() == [9]


def test_loader_takes_the_released_file_and_matches_a_forward_of_the_same_weights(tmp_path, one_torch_thread):
    path = tmp_path / "e4e_ffhq_encode.pt"
    written = write_random_e4e_checkpoint(path, seed=3, width=16)
    loaded = load_e4e(path, image_size=64)
    assert isinstance(loaded, E4E) and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    # reference: the same tensors put into a fresh module by hand (prefix stripped, latent_avg added after)
    ref = _meta_encoder(16)
    ref.load_state_dict({k.removeprefix("encoder."): v for k, v in written.items() if k != "latent_avg"},
                        assign=True)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        expected = ref.eval()(x) + written["latent_avg"]
        got = loaded(x)
    assert torch.equal(got, expected)
    assert not torch.allclose(got[0], got[1])  # the input reaches the output
    assert torch.equal(loaded.latent_avg, written["latent_avg"])


def test_loader_reads_the_width_64_release_layout_exactly(tmp_path):
    path = tmp_path / "e4e_ffhq_encode.pt"
    written = write_random_e4e_checkpoint(path, seed=0)  # ~7 MB: strided views into small pools
    assert path.stat().st_size < 32 * 2**20
    kept = read_e4e_checkpoint(path)
    assert not any(k.startswith("decoder.") for k in kept)  # the StyleGAN2 generator is ignored
    assert len(kept) == 621 + 1 and tuple(kept["latent_avg"].shape) == (18, 512)
    model = load_e4e(path)
    sd = model.state_dict()
    assert set(sd) == set(written)
    for key in ("encoder.input_layer.0.weight", "encoder.body.21.shortcut_layer.0.weight", "encoder.styles.17.linear"
                ".weight", "encoder.latlayer2.bias", "encoder.body.7.res_layer.4.running_var", "latent_avg"):
        assert torch.equal(sd[key], written[key]), key


def _save(path, state_dict, **top):
    torch.save({"state_dict": state_dict, "latent_avg": torch.zeros(18, 512), "opts": {}, **top}, str(path))


@pytest.fixture(scope="module")
def small_kept(tmp_path_factory):
    return write_random_e4e_checkpoint(tmp_path_factory.mktemp("e4e") / "e4e.pt", width=16)


def test_loader_is_strict_and_names_the_keys(tmp_path, small_kept):
    enc = {k: v for k, v in small_kept.items() if k != "latent_avg"}
    missing = dict(enc)
    del missing["encoder.latlayer1.bias"]
    _save(tmp_path / "missing.pt", missing)
    with pytest.raises(ValueError, match=r"missing keys \[encoder\.latlayer1\.bias\]"):
        load_e4e(tmp_path / "missing.pt")
    _save(tmp_path / "extra.pt", {**enc, "encoder.output_layer.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected keys \[encoder\.output_layer\.weight\]"):
        load_e4e(tmp_path / "extra.pt")
    _save(tmp_path / "stray.pt", {**enc, "discriminator.fc.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected keys \['discriminator\.fc\.weight'\] in state_dict"):
        load_e4e(tmp_path / "stray.pt")
    _save(tmp_path / "shape.pt", {**enc, "encoder.latlayer1.bias": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"shape mismatch encoder\.latlayer1\.bias"):
        load_e4e(tmp_path / "shape.pt")
    torch.save({"state_dict": enc, "opts": {}}, str(tmp_path / "noavg.pt"))
    with pytest.raises(ValueError, match="has no latent_avg"):
        load_e4e(tmp_path / "noavg.pt")
    torch.save(enc, str(tmp_path / "bare.pt"))
    with pytest.raises(ValueError, match="not the released layout"):
        load_e4e(tmp_path / "bare.pt")
    _save(tmp_path / "top.pt", enc, optimizer={})
    with pytest.raises(ValueError, match=r"unexpected top-level keys \['optimizer'\]"):
        load_e4e(tmp_path / "top.pt")
    with pytest.raises(FileNotFoundError, match="e4e_ffhq_encode.pt"):
        load_e4e(tmp_path / "absent.pt")


def test_latent_avg_as_the_bare_mean_is_repeated_to_18_rows(tmp_path, small_kept):
    enc = {k: v for k, v in small_kept.items() if k != "latent_avg"}
    mean = torch.randn(512)
    torch.save({"state_dict": enc, "latent_avg": mean, "opts": {}}, str(tmp_path / "mean.pt"))
    assert torch.equal(load_e4e(tmp_path / "mean.pt").latent_avg, mean.expand(18, 512))
    torch.save({"state_dict": enc, "latent_avg": torch.zeros(3), "opts": {}}, str(tmp_path / "bad.pt"))
    with pytest.raises(ValueError, match=r"shape mismatch latent_avg: expected \(18, 512\), got \(3,\)"):
        load_e4e(tmp_path / "bad.pt")


def test_loader_unpickles_weights_only(tmp_path, small_kept):
    """The release's opts is a plain dict (vars(opts)); anything that needs code to unpickle is refused."""
    enc = {k: v for k, v in small_kept.items() if k != "latent_avg"}
    _save(tmp_path / "ns.pt", enc, opts=argparse.Namespace(stylegan_size=1024))
    with pytest.raises(ValueError, match=r"cannot be read with torch\.load\(weights_only=True\)"):
        load_e4e(tmp_path / "ns.pt")
    _save(tmp_path / "ok.pt", enc, opts={"encoder_type": "Encoder4Editing", "lr": 1e-4, "checkpoint_path": None})
    assert isinstance(load_e4e(tmp_path / "ok.pt"), E4E)


def test_e4e_input_fills_the_background_white_at_256_in_minus_one_one():
    rgb = torch.full((1, 3, 512, 512), 0.25)
    matte = torch.zeros(1, 1, 512, 512)
    matte[..., 128:384, 128:384] = 1.0
    x = e4e_input(rgb, matte)
    assert tuple(x.shape) == (1, 3, 256, 256) and x.min() >= -1 and x.max() <= 1
    assert torch.allclose(x[..., :32, :32], torch.ones(1, 3, 32, 32))  # background -> white (+1)
    assert torch.allclose(x[..., 100:150, 100:150], torch.full((1, 3, 50, 50), -0.5))  # 0.25 -> -0.5
    with pytest.raises(ValueError, match="e4e_input needs rgb"):
        e4e_input(rgb, matte[:, :, :100])
