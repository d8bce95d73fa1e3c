"""Spatial tiling for frames too large to encode or decode at once.

The frame is cut into overlapping tiles, each tile goes through the (time-chunked) encoder or
decoder on its own, and the outputs are blended back with weights that ramp linearly across the
overlap, so each output pixel is a convex combination of the tiles that cover it and no seam
shows. A tile does not see its neighbours' pixels, so the result differs slightly from untiled
processing near tile borders (and a little everywhere, through the mid-block attention); the
error is measured in tests/test_vae_tiling.py.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of edge `tile` covering [0, size); the last tile ends at the edge."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    return [*range(0, size - tile, stride), size - tile]


def ramp(length: int, overlap: int, *, lead: bool, trail: bool) -> torch.Tensor:
    """Blend weights along one axis of a tile, on the sides that have a neighbour.

    Over an overlap the weight is 0 for the outer quarter (the pixels that saw the tile's zero
    padding most), rises linearly across the middle half, and is 1 beyond: neighbouring tiles
    cross-fade in the middle of their overlap.
    """
    weights = torch.ones(length)
    if overlap > 0:
        margin = overlap // 4
        rising = ((torch.arange(overlap) + 0.5 - margin) / (overlap - 2 * margin)).clamp(0.0, 1.0)
        if lead:
            weights[:overlap] = rising
        if trail:
            weights[-overlap:] = torch.minimum(weights[-overlap:], rising.flip(0))
    return weights


def tiled(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *, tile: int, overlap: int
) -> torch.Tensor:
    """Apply `fn` ((B, C, T, h, w) -> (B, C', T', h*s, w*s), same s for every tile) tile by tile.

    `tile` and `overlap` are in x's pixels; s may be a fraction (encoder) or an integer (decoder).
    """
    height, width = x.shape[-2:]
    rows, cols = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    out = weight_sum = None
    for i, top in enumerate(rows):
        for j, left in enumerate(cols):
            y = fn(x[..., top : top + tile, left : left + tile])  # (B, C', T', h', w')
            scale = y.shape[-1] / min(tile, width)
            if out is None:
                out = y.new_zeros(
                    *y.shape[:-2], round(height * scale), round(width * scale)
                )  # (B, C', T', H', W')
                weight_sum = y.new_zeros(out.shape[-2:])  # (H', W')
            out_overlap = round(overlap * scale)
            weight = torch.outer(
                ramp(y.shape[-2], out_overlap, lead=i > 0, trail=i < len(rows) - 1),
                ramp(y.shape[-1], out_overlap, lead=j > 0, trail=j < len(cols) - 1),
            ).to(y)  # (h', w')
            rows_out = slice(round(top * scale), round(top * scale) + y.shape[-2])
            cols_out = slice(round(left * scale), round(left * scale) + y.shape[-1])
            out[..., rows_out, cols_out] += y * weight
            weight_sum[rows_out, cols_out] += weight
    return out / weight_sum
