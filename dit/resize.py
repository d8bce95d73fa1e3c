"""Resize a trained DiT to a smaller spacetime patch, so a fine-tune at finer tokens starts from its weights.

    python -m dit.resize weights/demo --patch-size 1 2 2 --out outputs/demo/dit-1x2x2

The resized model is exact, not an approximation: on latents L it computes what the source model computes
on L upsampled by r = old patch / new patch (each latent position repeated r times per axis), averaged back
over each r-block,

    resized(L) == avg_pool_r(source(repeat_r(L)))

because the token grids of the two agree (S / new == r S / old), so do their RoPE and sin-cos positions,
and only the two patch-sized layers change: the patch embedding sums the source kernel over each r-block
(the r repeated positions all meet the same latent value) and the head averages its output rows over each
r-block. Every block, the text, time and modulation layers are copied unchanged. It is FlexiViT's patch
resize (Beyer et al. 2023) for the case where the token count changes with the patch and not the input:
the resized model sees each object r times larger than it was trained on, so it is a starting point for
fine-tuning at the new patch size, not a finished model.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch
from einops import reduce, repeat

from dit.model import DiT


def resize_ratio(old: tuple[int, ...], new: tuple[int, ...]) -> tuple[int, int, int]:
    """Per-axis r = old / new; each new patch side must divide the old one."""
    if len(new) != 3 or min(new) < 1:
        raise ValueError(f"patch_size={tuple(new)}: must be three positive ints (pt, ph, pw)")
    if any(o % n for o, n in zip(old, new, strict=True)):
        divisors = [[d for d in range(1, o + 1) if o % d == 0] for o in old]
        raise ValueError(
            f"patch_size={tuple(new)}: each side must divide the model's {tuple(old)}; sides per axis can be {divisors}"
        )
    return tuple(o // n for o, n in zip(old, new, strict=True))


@torch.no_grad()
def resize_patch(model: DiT, patch_size: tuple[int, int, int]) -> DiT:
    """A new DiT with `patch_size` whose weights are `model`'s, resized as the module docstring says."""
    patch_size = tuple(int(p) for p in patch_size)
    rt, rh, rw = resize_ratio(model.cfg.patch_size, patch_size)
    cfg = dataclasses.replace(model.cfg, patch_size=patch_size)  # validated again by DiTConfig.__post_init__
    with torch.device("meta"):
        resized = DiT(cfg)
    state = {key: value.clone() for key, value in model.state_dict().items()}

    # Conv3d kernel (D, C, pt, ph, pw): each new kernel position meets r repeated copies of one latent value.
    state["patch_embedding.weight"] = reduce(
        state["patch_embedding.weight"], "d c (t rt) (h rh) (w rw) -> d c t h w", "sum", rt=rt, rh=rh, rw=rw
    )  # (D, C, pt, ph, pw) of the new patch
    # Head rows are ordered (pt ph pw c) as unpatchify reads them; each new row averages its r-block.
    pt, ph, pw = patch_size
    sizes = dict(t=pt, h=ph, w=pw, rt=rt, rh=rh, rw=rw, c=cfg.out_channels)
    rows = "(t rt h rh w rw c)"
    weight, bias = "head.head.weight", "head.head.bias"
    state[weight] = reduce(state[weight], f"{rows} d -> (t h w c) d", "mean", **sizes)  # (pt*ph*pw*C_out, D)
    state[bias] = reduce(state[bias], f"{rows} -> (t h w c)", "mean", **sizes)  # (pt*ph*pw*C_out,)
    resized.load_state_dict(state, strict=True, assign=True)
    return resized


def repeat_latents(x: torch.Tensor, ratio: tuple[int, int, int]) -> torch.Tensor:
    """Latents (B, C, T', H', W') -> (B, C, rt T', rh H', rw W'), each position repeated r times per axis."""
    rt, rh, rw = ratio
    return repeat(x, "b c t h w -> b c (t rt) (h rh) (w rw)", rt=rt, rh=rh, rw=rw)


def pool_latents(x: torch.Tensor, ratio: tuple[int, int, int]) -> torch.Tensor:
    """The inverse grid of repeat_latents: (B, C, rt T', rh H', rw W') -> (B, C, T', H', W'), r-block means."""
    rt, rh, rw = ratio
    return reduce(x, "b c (t rt) (h rh) (w rw) -> b c t h w", "mean", rt=rt, rh=rh, rw=rw)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dit.resize",
        description="Resize a trained DiT to a smaller spacetime patch (more, finer tokens) for fine-tuning: "
                    "the resized model on latents L equals the source on L upsampled by old/new patch, "
                    "averaged back (see the module docstring). Writes a DiT folder (model.safetensors + "
                    "config.json) that train.py's init_from reads, with dit.patch_size and cond.patch_size "
                    "set to the new patch.",
        epilog="example: python -m dit.resize weights/demo --patch-size 1 2 2 --out outputs/demo/dit-1x2x2, "
               "then python train.py --config ... init_from=outputs/demo/dit-1x2x2 dit.patch_size=[1,2,2] "
               "cond.patch_size=[1,2,2]",
    )
    parser.add_argument("src", help="a DiT folder (save_pretrained) or a model folder holding dit/")
    parser.add_argument("--patch-size", type=int, nargs=3, required=True, metavar=("PT", "PH", "PW"),
                        help="the new patch; each side must divide the source's")
    parser.add_argument("--out", required=True, type=Path, help="output folder (model.safetensors + config.json)")
    args = parser.parse_args(argv)
    src = Path(args.src) / "dit" if (Path(args.src) / "dit" / "config.json").is_file() else Path(args.src)
    if not (src / "config.json").is_file():
        parser.error(f"{args.src}: no DiT config.json there or in {Path(args.src) / 'dit'}")
    model = DiT.from_pretrained(src)
    try:
        resized = resize_patch(model, tuple(args.patch_size))
    except ValueError as err:
        parser.error(str(err))
    resized.save_pretrained(args.out)
    print(f"{src}: patch {model.cfg.patch_size} -> {resized.cfg.patch_size}; wrote {args.out}")


if __name__ == "__main__":
    main()
