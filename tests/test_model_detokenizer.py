"""SEED-X's image decoder (mage.model.detokenizer) with tiny diffusers UNet2DConditionModel / AutoencoderKL."""
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers", reason="the decoder extra: pip install -e .[decoder] (CI installs it with .[test])")

from mage.model.detokenizer import (AdapterConfig, DetokenizerResampler, SamplingConfig, load_decoder,  # noqa: E402
                                    widen_conv_in)
from tests.real_fixtures import tiny_adapter_config, write_tiny_decoder  # noqa: E402

Q, D = 16, 128  # the tiny SEED-X's output features
SAMPLING = SamplingConfig(steps=3, size=32, seed=0)


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory):
    return write_tiny_decoder(tmp_path_factory.mktemp("pretrained"), embedding_dim=D, num_queries=Q)


def test_adapter_names_and_sizes_follow_the_checkpoint():
    cfg = tiny_adapter_config(D, Q)
    state = {f"resampler.{k}": v for k, v in DetokenizerResampler(cfg).state_dict().items()}
    assert AdapterConfig.from_state_dict(state) == cfg
    names = set(state)
    for key in ("resampler.latents", "resampler.proj_in.weight", "resampler.layers.0.0.to_kv.weight",
                "resampler.layers.0.1.3.weight", "resampler.unet_attnpool.positional_embedding",
                "resampler.unet_attnpool.c_proj.bias", "resampler.unet_proj_2.weight", "resampler.norm_out.weight"):
        assert key in names
    real = AdapterConfig()  # SEED-X's: 64 latents of 1024, depth 4, 16 heads, 4096 -> 768 + 1280
    states, pooled = DetokenizerResampler(tiny_adapter_config(D, Q))(torch.randn(2, Q, D))
    assert states.shape == (2, Q, 48) and pooled.shape == (2, 32) and real.heads * 64 == real.dim


def test_widen_conv_in_keeps_the_noise_channels():
    from tests.real_fixtures import _tiny_unet
    unet = _tiny_unet(tiny_adapter_config(D, Q))
    before = unet.conv_in.weight.clone()
    widen_conv_in(unet, 8)
    assert unet.conv_in.in_channels == 8 and unet.config.in_channels == 8
    torch.testing.assert_close(unet.conv_in.weight[:, :4], before)
    assert not unet.conv_in.weight[:, 4:].any()


def test_generation_and_editing_decode_images(decoder_dir):
    negative = torch.zeros(Q, D)
    gen = load_decoder(decoder_dir, negative, kind="generate")
    assert not gen.edits
    feats = torch.randn(2, Q, D)
    images = gen.decode(feats, sampling=SAMPLING)
    assert len(images) == 2 and images[0].size == (32, 32) and images[0].mode == "RGB"
    again = gen.decode(feats, sampling=SAMPLING)
    assert np.array_equal(np.asarray(images[0]), np.asarray(again[0]))  # seeded
    other = gen.decode(torch.randn(2, Q, D), sampling=SAMPLING)
    assert not np.array_equal(np.asarray(images[0]), np.asarray(other[0]))  # the features steer the image
    with pytest.raises(ValueError, match="8-channel"):
        gen.decode(feats, source_images=[Image.new("RGB", (40, 40))] * 2, sampling=SAMPLING)

    edit = load_decoder(decoder_dir, negative, kind="edit")
    assert edit.edits
    red, blue = Image.new("RGB", (50, 40), (220, 20, 20)), Image.new("RGB", (50, 40), (20, 20, 220))
    a = edit.decode(feats[:1], source_images=[red], sampling=SAMPLING)[0]
    b = edit.decode(feats[:1], source_images=[blue], sampling=SAMPLING)[0]
    assert not np.array_equal(np.asarray(a), np.asarray(b))  # conditioned on the source image
    assert edit.decode(feats[:1], sampling=SAMPLING)[0].size == (32, 32)  # an editing UNet also generates


def test_guidance_combines_to_the_conditional_prediction_when_branches_agree(decoder_dir):
    """With the unconditional features equal to the conditional ones, every guidance scale gives the
    same image (the guidance weights sum to one), and it differs from a run with other negatives."""
    feats = torch.randn(1, Q, D)
    gen = load_decoder(decoder_dir, feats[0], kind="generate")
    strong = gen.decode(feats, sampling=SAMPLING)[0]
    plain = gen.decode(feats, sampling=dataclasses.replace(SAMPLING, guidance_scale=1.0))[0]
    np.testing.assert_allclose(np.asarray(strong, dtype=float), np.asarray(plain, dtype=float), atol=2)
    gen.negative_features = torch.zeros(Q, D)
    assert not np.array_equal(np.asarray(gen.decode(feats, sampling=SAMPLING)[0]), np.asarray(strong))


def test_missing_pieces_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="stable-diffusion-xl-base-1.0"):
        load_decoder(tmp_path, torch.zeros(Q, D))
