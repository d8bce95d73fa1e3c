"""Parity with diffusers' WanTransformer3DModel on the same weights, through both Wan layouts."""

import json

import pytest
import torch
from helpers import relative_error

from dit.convert import (
    config_from_state_dict,
    diffusers_to_original,
    load_wan,
    main,
    original_to_diffusers,
    to_original,
)
from dit.model import DiT

diffusers = pytest.importorskip("diffusers")

HEADS = 2


@pytest.fixture(scope="module")
def reference():
    """A tiny random diffusers Wan transformer: head dim 16, so RoPE splits it 8 / 4 / 4."""
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=HEADS,
        attention_head_dim=16,
        in_channels=4,
        out_channels=6,
        text_dim=24,
        freq_dim=16,
        ffn_dim=64,
        num_layers=2,
        cross_attn_norm=True,
        eps=1e-6,
        rope_max_seq_len=64,
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)  # all random, including the zero-looking biases and tables
    return model


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 3, 4, 6, generator=g)
    text = torch.randn(2, 7, 24, generator=g)
    return x, text, torch.ones(2, 7, dtype=torch.bool)


def assert_parity(model: DiT, reference) -> None:
    x, text, mask = inputs()
    per_sample = torch.tensor([10.0, 700.0])
    per_token = torch.rand(2, 3 * 2 * 3, generator=torch.Generator().manual_seed(1)) * 1000
    with torch.no_grad():
        for t in (per_sample, per_token):
            expected = reference(x, t, text, return_dict=False)[0]
            assert relative_error(model(x, t, text, mask), expected) <= 1e-5


def save_folder(folder, state, config):
    from safetensors.torch import save_file

    folder.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(json.dumps(config))


def test_key_maps_are_inverse_and_cover_every_parameter(reference):
    state = reference.state_dict()
    original = diffusers_to_original(state)
    assert original_to_diffusers(original).keys() == state.keys()
    fresh = DiT(config_from_state_dict(original, num_heads=HEADS))
    assert set(fresh.state_dict()) == set(original)


def test_diffusers_layout_folder_gives_diffusers_output(reference, tmp_path):
    save_folder(tmp_path / "transformer", reference.state_dict(), dict(reference.config))
    model = load_wan(tmp_path / "transformer").eval()
    assert model.cfg.num_heads == HEADS and model.cfg.out_channels == 6
    assert_parity(model, reference)


def test_original_layout_folder_gives_diffusers_output(reference, tmp_path):
    original = diffusers_to_original(reference.state_dict())
    wan_config = {"dim": 32, "num_heads": HEADS, "num_layers": 2, "eps": 1e-6, "text_len": 512}
    save_folder(tmp_path / "wan", {"model.diffusion_model." + k: v for k, v in original.items()}, wan_config)
    model = load_wan(tmp_path / "wan").eval()
    assert_parity(model, reference)


def test_cli_writes_a_loadable_folder(reference, tmp_path):
    save_folder(tmp_path / "transformer", reference.state_dict(), dict(reference.config))
    main([str(tmp_path / "transformer"), "--out", str(tmp_path / "ours")])
    assert_parity(DiT.from_pretrained(tmp_path / "ours").eval(), reference)


def test_image_to_video_weights_are_refused(reference):
    state = dict(reference.state_dict())
    state["blocks.0.attn2.add_k_proj.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="image-to-video"):
        to_original(state)
