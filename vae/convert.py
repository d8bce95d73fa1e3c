"""Import public Wan 2.1 VAE weights into our safetensors folder.

Two layouts exist:
  * original: Wan 2.1's `Wan2.1_VAE.pth` (or a safetensors re-save of it). Our module names are
    Wan's, so its keys load as they are; the config is read off the tensor shapes.
  * diffusers: an `AutoencoderKLWan` folder (`config.json` + `diffusion_pytorch_model.safetensors`,
    or a pipeline folder with a `vae/` sub-folder). Keys are renamed by `diffusers_key`.

    python -m vae.convert SRC --out DIR     # SRC: .pth / .safetensors file or diffusers folder
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from vae.model import WAN21_LATENTS_MEAN, WAN21_LATENTS_STD, CausalVAE, VAEConfig

_RESIDUAL_NAMES = {
    "residual.0.": "norm1.",
    "residual.2.": "conv1.",
    "residual.3.": "norm2.",
    "residual.6.": "conv2.",
}
_HEAD_NAMES = {"0": "norm_out", "2": "conv_out"}
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


def diffusers_key(key: str, cfg: VAEConfig) -> str:
    """Name of our (= Wan original) parameter `key` in diffusers' AutoencoderKLWan."""
    key = re.sub(r"^conv1\.", "quant_conv.", key)
    key = re.sub(r"^conv2\.", "post_quant_conv.", key)
    key = re.sub(r"^(encoder|decoder)\.conv1\.", r"\1.conv_in.", key)
    key = re.sub(r"^(encoder|decoder)\.head\.(\d)\.", lambda m: f"{m[1]}.{_HEAD_NAMES[m[2]]}.", key)
    key = re.sub(r"^(encoder|decoder)\.middle\.1\.", r"\1.mid_block.attentions.0.", key)
    key = re.sub(
        r"^(encoder|decoder)\.middle\.(0|2)\.", lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) // 2}.", key
    )
    key = re.sub(r"^encoder\.downsamples\.", "encoder.down_blocks.", key)

    def up_block(match: re.Match) -> str:
        # our decoder is flat: per level, its residual blocks then one Upsample (none after the last level)
        index = int(match[1])
        for level, blocks in enumerate(cfg.level_decoder_blocks):
            if index <= blocks:
                inner = f"resnets.{index}" if index < blocks else "upsamplers.0"
                return f"decoder.up_blocks.{level}.{inner}."
            index -= blocks + 1
        raise ValueError(f"{key}: no decoder level holds block {match[1]} ({cfg.level_decoder_blocks} blocks)")

    key = re.sub(r"^decoder\.upsamples\.(\d+)\.", up_block, key)
    for ours, theirs in _RESIDUAL_NAMES.items():
        key = key.replace(ours, theirs)
    return key.replace(".shortcut.", ".conv_shortcut.")


def from_diffusers_state(state: dict[str, torch.Tensor], cfg: VAEConfig) -> dict[str, torch.Tensor]:
    """Rename a diffusers AutoencoderKLWan state dict to our layout; every key must be accounted for."""
    with torch.device("meta"):
        our_keys = list(CausalVAE(cfg).state_dict())
    names = {diffusers_key(key, cfg): key for key in our_keys}
    unknown = sorted(set(state) - set(names))
    missing = sorted(set(names) - set(state))
    if unknown or missing:
        raise ValueError(
            f"diffusers state dict does not match the config: unknown {unknown[:5]}, missing {missing[:5]}"
        )
    return {names[key]: value for key, value in state.items()}


def config_from_diffusers(config: dict) -> VAEConfig:
    """Our config from an AutoencoderKLWan config.json; Wan 2.2 and patched variants are refused."""
    unsupported = {
        "attn_scales": (config.get("attn_scales") or [], []),
        "is_residual": (config.get("is_residual", False), False),
        "patch_size": (config.get("patch_size"), None),
        "in_channels": (config.get("in_channels", 3), 3),
        "out_channels": (config.get("out_channels", 3), 3),
        "decoder_base_dim": (config.get("decoder_base_dim") or config["base_dim"], config["base_dim"]),
    }
    for name, (value, allowed) in unsupported.items():
        if value != allowed:
            raise ValueError(
                f"diffusers config {name}={value}: only {allowed} is supported (the Wan 2.1 VAE)"
            )
    z_dim = config["z_dim"]
    mean, std = config.get("latents_mean"), config.get("latents_std")
    # diffusers keeps its 16 Wan defaults even for other widths; they only describe 16 channels
    has_stats = mean is not None and std is not None and len(mean) == len(std) == z_dim
    return VAEConfig(
        base_dim=config["base_dim"],
        dim_mult=tuple(config["dim_mult"]),
        num_res_blocks=config["num_res_blocks"],
        latent_channels=z_dim,
        temporal_downsample=tuple(config["temperal_downsample"]),
        dropout=config.get("dropout", 0.0),
        latents_mean=list(mean) if has_stats else None,
        latents_std=list(std) if has_stats else None,
    )


def config_from_original_state(state: dict[str, torch.Tensor]) -> VAEConfig:
    """Read the architecture off the shapes of an original-layout Wan state dict."""
    base_dim = state["encoder.conv1.weight"].shape[0]
    latent_channels = state["conv2.weight"].shape[0]
    level_widths, blocks_per_level, temporal, blocks = [], [], [], 0
    index = 0
    while f"encoder.downsamples.{index}.residual.2.weight" in state or (
        f"encoder.downsamples.{index}.resample.1.weight" in state
    ):
        prefix = f"encoder.downsamples.{index}."
        if prefix + "residual.2.weight" in state:
            blocks += 1
            width = state[prefix + "residual.2.weight"].shape[0]
        else:  # a Downsample closes the level
            level_widths.append(width)
            blocks_per_level.append(blocks)
            temporal.append(prefix + "time_conv.weight" in state)
            blocks = 0
        index += 1
    level_widths.append(width)
    blocks_per_level.append(blocks)
    if len(set(blocks_per_level)) != 1:
        raise ValueError(
            f"residual blocks per level {blocks_per_level}: expected the same count at every level"
        )
    is_wan21 = (base_dim, latent_channels, tuple(level_widths)) == (96, 16, (96, 192, 384, 384))
    return VAEConfig(
        base_dim=base_dim,
        dim_mult=tuple(width // base_dim for width in level_widths),
        num_res_blocks=blocks_per_level[0],
        latent_channels=latent_channels,
        temporal_downsample=tuple(temporal),
        latents_mean=list(WAN21_LATENTS_MEAN) if is_wan21 else None,
        latents_std=list(WAN21_LATENTS_STD) if is_wan21 else None,
    )


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    # tensor-only unpickler: importing a peer's file; we never write pickle ourselves
    return torch.load(path, map_location="cpu", weights_only=True)


def load_wan_vae(src: str | Path) -> CausalVAE:
    """Build a CausalVAE from public Wan 2.1 weights in either layout (auto-detected)."""
    src = Path(src)
    if src.is_dir():
        folder = src / "vae" if (src / "vae" / "config.json").exists() else src
        if not (folder / "config.json").exists() or not (folder / DIFFUSERS_WEIGHTS).exists():
            raise ValueError(
                f"{src}: a diffusers folder needs config.json and {DIFFUSERS_WEIGHTS} (or a vae/ folder)"
            )
        cfg = config_from_diffusers(json.loads((folder / "config.json").read_text()))
        state = from_diffusers_state(_read_tensors(folder / DIFFUSERS_WEIGHTS), cfg)
    else:
        state = _read_tensors(src)
        if "encoder.conv_in.weight" in state:  # a diffusers state dict saved as a single file
            raise ValueError(f"{src}: diffusers-layout weights need their config.json; pass the folder")
        if "encoder.conv1.weight" not in state:
            raise ValueError(f"{src}: neither the Wan original nor the diffusers VAE layout")
        cfg = config_from_original_state(state)
    model = CausalVAE(cfg)
    model.load_state_dict({key: value.float() for key, value in state.items()})
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("src", type=Path, help="Wan2.1_VAE.pth / .safetensors, or a diffusers folder")
    parser.add_argument("--out", type=Path, required=True, help="our folder: model.safetensors + config.json")
    args = parser.parse_args(argv)
    model = load_wan_vae(args.src)
    model.save_pretrained(args.out)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out} ({params / 1e6:.1f}M parameters, config {model.cfg})")


if __name__ == "__main__":
    main()
