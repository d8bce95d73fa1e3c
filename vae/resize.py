"""Grow a trained VAE's decoder without changing its latent space or what it decodes.

    python -m vae.resize weights/demo --decoder-blocks 2 2 4 --out outputs/demo/vae-grown

Each decoder level (lowest resolution first) gets the residual blocks asked for; the source's blocks keep
their weights and stay first in their level, and each new block is appended after them with the last
convolution of its residual branch at zero, so it passes its input through unchanged (its shortcut is the
identity: a new block keeps the level's width) and the grown VAE decodes every latent exactly as the source
does. The other weights of a new block are fresh random ones (drawn by `seed`), so the gradient reaches the
zeroed convolution from the first step. The encoder is copied unchanged, so latents, latent statistics and a
DiT trained on them stay valid: only a decoder fine-tune (encoder frozen) follows.

Why: a decoder that has stopped improving at its size (the demo's draws small moving outlines between the
frames that close each latent frame's group less well than those frames, docs/demo.md) can be given more
capacity where the frames are drawn, at full time resolution, without training the VAE and the DiT again.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from checkpoint import model_folder
from vae.layers import ResidualBlock
from vae.model import CausalVAE


def decoder_levels(vae: CausalVAE) -> list[list[int]]:
    """Indices into `decoder.upsamples` of each level's residual blocks, lowest resolution first."""
    levels: list[list[int]] = [[]]
    for index, module in enumerate(vae.decoder.upsamples):
        if isinstance(module, ResidualBlock):
            levels[-1].append(index)
        else:  # an Upsample closes its level
            levels.append([])
    return levels


def grow_decoder(vae: CausalVAE, blocks: tuple[int, ...], *, seed: int = 0) -> CausalVAE:
    """A copy of `vae` whose decoder has `blocks[level]` residual blocks per level; decodes exactly as `vae`."""
    old = vae.cfg.level_decoder_blocks
    if len(blocks) != len(old):
        raise ValueError(f"decoder blocks {tuple(blocks)}: needs {len(old)} entries, one per decoder level {old}")
    if any(new < was for new, was in zip(blocks, old, strict=True)):
        raise ValueError(f"decoder blocks {tuple(blocks)}: can only grow the source's {old}, not shrink it")
    if tuple(blocks) == old:
        raise ValueError(f"decoder blocks {tuple(blocks)}: the source already has these; nothing to grow")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        grown = CausalVAE(dataclasses.replace(vae.cfg, decoder_blocks=tuple(blocks)))
    grown = grown.to(dtype=next(vae.parameters()).dtype)

    # source index -> grown index in decoder.upsamples: each level's old blocks first, then its Upsample
    moved: dict[int, int] = {}
    for was, now in zip(decoder_levels(vae), decoder_levels(grown), strict=True):
        moved.update(zip(was, now[: len(was)], strict=True))  # the source's blocks first; the rest of `now` is new
        if was[-1] + 1 < len(vae.decoder.upsamples):  # every level but the last closes with an Upsample
            moved[was[-1] + 1] = now[-1] + 1
    prefix = "decoder.upsamples."
    state = grown.state_dict()  # the new blocks keep their fresh weights; every source weight moves in
    for key, value in vae.state_dict().items():
        if key.startswith(prefix):
            index, rest = key[len(prefix) :].split(".", 1)
            key = f"{prefix}{moved[int(index)]}.{rest}"
        state[key] = value
    grown.load_state_dict(state)  # strict: a source weight with no place in the grown model is an error
    kept = set(moved.values())
    with torch.no_grad():
        for index, module in enumerate(grown.decoder.upsamples):
            if index not in kept:
                last = module.residual[-1]  # the residual branch's last conv: zero, so the block is the identity
                last.weight.zero_()
                last.bias.zero_()
    return grown.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m vae.resize",
        description="Grow a trained VAE's decoder (more residual blocks per level) so that it decodes exactly as "
        "before; the encoder and latent statistics are copied, so a DiT trained on its latents stays valid. "
        "Then fine-tune the decoder with the encoder frozen (train.py with init_from the grown folder, "
        "vae.decoder_blocks set to the same counts and optim.lr_scales 0 for 'vae\\.(encoder|conv1)\\.', as "
        "configs/demo/recipe-vae-sharpen.yaml does).",
        epilog="example: python -m vae.resize weights/demo --decoder-blocks 2 2 4 --out outputs/demo/vae-grown",
    )
    parser.add_argument("src", type=Path, help="a VAE folder (save_pretrained) or a model folder holding vae/")
    parser.add_argument("--decoder-blocks", type=int, nargs="+", required=True, metavar="N",
                        help="residual blocks per decoder level, lowest resolution first (the demo VAE has 2 2 2)")
    parser.add_argument("--seed", type=int, default=0, help="draws the new blocks' weights")
    parser.add_argument("--out", required=True, type=Path, help="output folder (model.safetensors + config.json)")
    args = parser.parse_args(argv)

    src = model_folder(args.src, part="vae")
    if not (src / "config.json").is_file():
        parser.error(f"{args.src}: no VAE config.json there or in {args.src / 'vae'}; give a VAE folder")
    vae = CausalVAE.from_pretrained(src)
    try:
        grown = grow_decoder(vae, tuple(args.decoder_blocks), seed=args.seed)
    except ValueError as err:
        parser.error(str(err))
    grown.save_pretrained(args.out)
    count = sum(p.numel() for p in grown.decoder.parameters()) - sum(p.numel() for p in vae.decoder.parameters())
    print(f"decoder blocks {vae.cfg.level_decoder_blocks} -> {grown.cfg.level_decoder_blocks} "
          f"(+{count:,} parameters): {args.out}")


if __name__ == "__main__":
    main()
