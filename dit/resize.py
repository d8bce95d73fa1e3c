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

`grow` makes a model deeper and its MLPs wider without changing what it computes:

    python -m dit.resize weights/demo --num-layers 6 --ffn-dim 1024 --out outputs/demo/dit-grown

The source's blocks keep their weights and are spread over the new depth; each new block starts with its
three residual output projections (self-attention, cross-attention, MLP) at zero, so it adds nothing and
the residual stream passes through it unchanged; each new MLP unit starts with its output column at zero.
Every new weight that feeds those zeros is a fresh random one, so the gradients reach them from the first
step (a zero there as well would keep a new block dead). It is the function-preserving growth of Net2Net
(Chen et al. 2016) for a pre-norm residual stack: capacity added to a trained model that has stopped
improving, without starting over.

`add_self_cond` gives a trained model the self-conditioning input (DiTConfig.self_cond) at zero weight,
so it computes what it computed whatever estimate it is given, and learns to read it in a fine-tune
with `diffusion.self_cond` > 0:

    python -m dit.resize weights/demo --self-cond --out outputs/demo/dit-self-cond
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


@torch.no_grad()
def grow(model: DiT, *, num_layers: int | None = None, ffn_dim: int | None = None, seed: int = 0) -> DiT:
    """A DiT with `num_layers` blocks and MLPs `ffn_dim` wide that computes exactly what `model` computes
    (module docstring); `seed` draws the new weights. None keeps the model's value."""
    num_layers = model.cfg.num_layers if num_layers is None else int(num_layers)
    ffn_dim = model.cfg.ffn_dim if ffn_dim is None else int(ffn_dim)
    if num_layers < model.cfg.num_layers or ffn_dim < model.cfg.ffn_dim:
        raise ValueError(f"num_layers={num_layers}, ffn_dim={ffn_dim}: growing cannot shrink the model's "
                         f"num_layers={model.cfg.num_layers}, ffn_dim={model.cfg.ffn_dim}")
    cfg = dataclasses.replace(model.cfg, num_layers=num_layers, ffn_dim=ffn_dim)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        grown = DiT(cfg)
    # state_dict() tensors share the parameters' storage: writing into them in place sets the grown model.
    state = grown.state_dict()
    for key, value in model.state_dict().items():
        if not key.startswith("blocks."):
            state[key].copy_(value)
    old_ffn = model.cfg.ffn_dim
    # Old block j goes to slot j * (N - 1) / (n - 1): first and last stay first and last, new ones fall between.
    slots = [round(j * (num_layers - 1) / max(model.cfg.num_layers - 1, 1)) for j in range(model.cfg.num_layers)]
    for old, slot in zip(model.blocks, slots, strict=True):
        targets = grown.blocks[slot].state_dict()
        for key, value in old.state_dict().items():
            if key in ("ffn.0.weight", "ffn.0.bias"):  # (F, D) / (F,): the old units first
                targets[key][:old_ffn] = value
            elif key == "ffn.2.weight":  # (D, F): the new units' columns start at zero
                targets[key].zero_()
                targets[key][:, :old_ffn] = value
            else:
                targets[key].copy_(value)
    for index in sorted(set(range(num_layers)) - set(slots)):
        for layer in ("self_attn.o", "cross_attn.o", "ffn.2"):
            projection = grown.blocks[index].get_submodule(layer)
            projection.weight.zero_()
            projection.bias.zero_()
    reference = next(model.parameters())
    return grown.to(reference.device, reference.dtype)


@torch.no_grad()
def add_self_cond(model: DiT) -> DiT:
    """`model` with the self-conditioning input: the patch embedding's new input channels (the estimate's)
    start at zero, so the result computes exactly what `model` computes for any `x0_prev`."""
    if model.cfg.self_cond:
        raise ValueError("the model is self-conditioned already (its config has self_cond=True)")
    with torch.device("meta"):
        conditioned = DiT(dataclasses.replace(model.cfg, self_cond=True))
    state = {key: value.clone() for key, value in model.state_dict().items()}
    weight = state["patch_embedding.weight"]  # (D, C, pt, ph, pw)
    state["patch_embedding.weight"] = torch.cat([weight, torch.zeros_like(weight)], dim=1)  # (D, 2C, pt, ph, pw)
    conditioned.load_state_dict(state, strict=True, assign=True)
    return conditioned


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
        description="Resize a trained DiT for fine-tuning: to a smaller spacetime patch (more, finer tokens; "
                    "the resized model on latents L equals the source on L upsampled by old/new patch, "
                    "averaged back) and/or to more blocks and wider MLPs (the grown model computes exactly "
                    "what the source computes). See the module docstring. Writes a DiT folder "
                    "(model.safetensors + config.json) that train.py's init_from reads, with the dit.* "
                    "(and, for a new patch, cond.patch_size) settings set to the new model's.",
        epilog="examples: python -m dit.resize weights/demo --patch-size 1 2 2 --out outputs/demo/dit-1x2x2, "
               "then python train.py --config ... init_from=outputs/demo/dit-1x2x2 dit.patch_size=[1,2,2] "
               "cond.patch_size=[1,2,2]; python -m dit.resize weights/demo --num-layers 6 --ffn-dim 1024 "
               "--out outputs/demo/dit-grown, then init_from=outputs/demo/dit-grown dit.num_layers=6 "
               "dit.ffn_dim=1024",
    )
    parser.add_argument("src", help="a DiT folder (save_pretrained) or a model folder holding dit/")
    parser.add_argument("--patch-size", type=int, nargs=3, metavar=("PT", "PH", "PW"),
                        help="the new patch; each side must divide the source's")
    parser.add_argument("--num-layers", type=int, help="blocks of the grown model (at least the source's)")
    parser.add_argument("--ffn-dim", type=int, help="MLP width of the grown model (at least the source's)")
    parser.add_argument("--seed", type=int, default=0, help="draws the grown model's new weights")
    parser.add_argument("--self-cond", action="store_true",
                        help="add the self-conditioning input at zero weight (then train with dit.self_cond=true "
                             "diffusion.self_cond=0.5)")
    parser.add_argument("--out", required=True, type=Path, help="output folder (model.safetensors + config.json)")
    args = parser.parse_args(argv)
    if args.patch_size is None and args.num_layers is None and args.ffn_dim is None and not args.self_cond:
        parser.error("nothing to change: give --patch-size, --num-layers, --ffn-dim and/or --self-cond")
    src = Path(args.src) / "dit" if (Path(args.src) / "dit" / "config.json").is_file() else Path(args.src)
    if not (src / "config.json").is_file():
        parser.error(f"{args.src}: no DiT config.json there or in {Path(args.src) / 'dit'}")
    model = DiT.from_pretrained(src)
    resized = model
    try:
        if args.patch_size is not None:
            resized = resize_patch(resized, tuple(args.patch_size))
        if args.num_layers is not None or args.ffn_dim is not None:
            resized = grow(resized, num_layers=args.num_layers, ffn_dim=args.ffn_dim, seed=args.seed)
        if args.self_cond:
            resized = add_self_cond(resized)
    except ValueError as err:
        parser.error(str(err))
    resized.save_pretrained(args.out)
    before, after = model.cfg, resized.cfg
    print(f"{src}: patch {before.patch_size} -> {after.patch_size}, blocks {before.num_layers} -> "
          f"{after.num_layers}, MLP {before.ffn_dim} -> {after.ffn_dim}, self-conditioned {before.self_cond} -> "
          f"{after.self_cond}; wrote {args.out}")


if __name__ == "__main__":
    main()
