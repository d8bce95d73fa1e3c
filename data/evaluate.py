"""Score a generated clip against its prompt, from the pixels alone, in the synthetic world.

`describe` reads the attributes back from pixels: the background is the median colour of the frame
border; the foreground is whatever differs from it; the colour is the nearest palette colour of the
foreground's core; size and position come from the foreground's extent (every shape of
data/synthetic.py fills the same bounding box); the shape is the template that best overlaps the
foreground; the motion is the displacement of its centre from the first frame to the last.
Anything without a clear single object on a plain background reads as "unknown", so noise scores
zero rather than chance.

    python -m data.evaluate DIR     # media files with x.txt or x.json ({"prompt": ..., "group": ...}) sidecars
    python -m data.evaluate DIR --groups seen heldout --by size shape   # + which sizes and shapes are missed
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
from collections import Counter
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from data.synthetic import (
    BACKGROUND_WORDS,
    BACKGROUNDS,
    COLOURS,
    SHAPE_WORDS,
    SHAPES,
    SIZE_WORDS,
    SIZES,
    coverage,
)
from data.video_io import IMAGE_SUFFIXES, VideoReadError, probe, read_frames

ATTRIBUTES = ("colour", "shape", "size", "motion")
UNKNOWN = "unknown"
MEDIA_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif", *IMAGE_SUFFIXES)

# Prompt words for each motion (any template, not only ours); the first value named in the prompt wins.
_MOTION_WORDS: dict[str, tuple[str, ...]] = {
    "left": ("left", "leftward", "leftwards"),
    "right": ("right", "rightward", "rightwards"),
    "up": ("up", "upward", "upwards", "rising", "rises", "ascending"),
    "down": ("down", "downward", "downwards", "falling", "falls", "sinking", "descending"),
    "static": ("still", "static", "motionless", "stationary", "not moving", "resting", "unmoving"),
}
_PROMPT_WORDS: dict[str, dict[str, tuple[str, ...]]] = {
    "colour": {name: (name,) for name in COLOURS},
    "shape": SHAPE_WORDS,
    "size": SIZE_WORDS,
    "motion": _MOTION_WORDS,
    "background": BACKGROUND_WORDS,
}

# All distances are Euclidean in 0-255 RGB. Palette colours are >= 150 apart and >= 140 from every
# background, so half of that separates "this colour" from "something else" with room for H.264 error.
_BORDER_FRACTION = 0.03  # border ring width, as a fraction of min(H, W)
_BORDER_UNIFORM = 0.8  # this share of border pixels must be within _BACKGROUND_TOL of their median
_BACKGROUND_TOL = 55.0  # wide enough for noise of ~25 levels per channel on generated backgrounds
_FOREGROUND_MIN_DISTANCE = 60.0  # a pixel this far from the background is foreground
_COLOUR_TOL = 75.0  # the core colour must be this close to a palette colour
_MIN_OBJECT_PIXELS = 12  # per frame, below this nothing is there (a small shape at 32x32 has ~30)
_MAX_OBJECT_SHARE = 0.4  # per frame, a foreground larger than this share of the frame is not one shape
_MIN_FILL = 0.35  # foreground / bounding-box area; two objects or scattered pixels fall below it
_MAX_STRAY = 0.06  # share of the foreground allowed outside the object's box (a second object)
_MIN_SHAPE_IOU = 0.6  # the best template must overlap the foreground at least this much
_TEMPLATE_SUPERSAMPLE = 2  # sub-pixel samples per axis for the shape templates: 4x cheaper than rendering's 4
# Relative half-extents between the small and large presets: the boundary is their geometric mean.
_SIZE_BOUNDARY = (SIZES["small"] * SIZES["large"]) ** 0.5
_SIZE_RANGE = (0.5 * SIZES["small"], 1.5 * SIZES["large"])
# Centre displacement over the clip, as a fraction of the frame along each axis (the world moves 0.35).
_STATIC_BELOW = 0.08
_MOVING_ABOVE = 0.15
_OFF_AXIS_RATIO = 0.5  # the other axis may move at most this fraction of the main one


def parse_prompt(prompt: str) -> dict[str, str | None]:
    """The attribute values a prompt names, None where it names none: keys colour, shape, size,
    motion, background. Works on free text: the first word of each vocabulary found wins."""
    text = prompt.lower()
    named: dict[str, str | None] = {}
    for attribute, vocabulary in _PROMPT_WORDS.items():
        first: tuple[int, str] | None = None
        for value, words in vocabulary.items():
            for word in words:
                match = re.search(rf"\b{re.escape(word)}\b", text)
                if match and (first is None or match.start() < first[0]):
                    first = (match.start(), value)
        named[attribute] = None if first is None else first[1]
    return named


def _load(video: torch.Tensor | str | os.PathLike) -> torch.Tensor:
    if isinstance(video, torch.Tensor):
        if video.ndim != 4 or video.shape[0] != 3:
            raise ValueError(f"video.shape={tuple(video.shape)}: must be (3, T, H, W) in [-1, 1]")
        return video.detach().float().cpu()  # generated on any device in any dtype; scored on the CPU
    info = probe(video)
    return read_frames(video, range(info.num_frames))  # (3, T, H, W)


def _nearest(rgb: torch.Tensor, palette: Mapping[str, tuple[int, int, int]], tolerance: float) -> str:
    names = list(palette)
    distances = (torch.tensor([palette[name] for name in names], dtype=torch.float32) - rgb).square().sum(1).sqrt()
    best = int(distances.argmin())
    return names[best] if distances[best] <= tolerance else UNKNOWN


def _border(pixels: torch.Tensor) -> torch.Tensor:
    """Border-ring pixels of every frame: (3, N) from (3, T, H, W)."""
    _, _, height, width = pixels.shape
    ring = max(1, round(_BORDER_FRACTION * min(height, width)))
    on_ring = torch.ones(height, width, dtype=torch.bool)
    on_ring[ring:height - ring, ring:width - ring] = False
    return pixels[:, :, on_ring].flatten(1)  # (3, T * ring pixels)


def _profile_extent(profile: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre and length of a per-frame coverage profile (T, N) along its axis, in pixels."""
    positions = torch.arange(profile.shape[1], dtype=torch.float32) + 0.5  # pixel i spans [i, i+1)
    length = profile.sum(dim=1)  # (T,)
    return (profile * positions).sum(dim=1) / length, length


def describe(video: torch.Tensor | str | os.PathLike, *, by_frame: bool = False) -> dict:
    """Attributes read from the pixels of a (3, T, H, W) clip in [-1, 1] or a media file.

    Keys colour, shape, size, motion, background; "unknown" where no clear answer exists (no single
    object on a plain background), motion None for a single frame. With `by_frame`, also "frame_shapes": the
    shape each frame alone reads as (the template it overlaps most; the clip's shape is the best mean over
    frames), or None where no object was segmented.
    """
    video = _load(video)
    # Channel-first throughout: per-pixel colour distances then reduce over a contiguous leading axis.
    pixels = (video.clamp(-1, 1) + 1) * 127.5  # (3, T, H, W)
    _, frames, height, width = pixels.shape
    result: dict = {attribute: UNKNOWN for attribute in ATTRIBUTES}
    result["background"] = UNKNOWN
    if by_frame:
        result["frame_shapes"] = None
    if frames == 1:
        result["motion"] = None

    border = _border(pixels)  # (3, N)
    background = border.median(dim=1).values  # (3,)
    border_distance = (border - background[:, None]).square().sum(0).sqrt()  # (N,)
    if (border_distance <= _BACKGROUND_TOL).float().mean() < _BORDER_UNIFORM:
        return result  # no plain background: noise, a textured scene, a cut
    result["background"] = _nearest(background, BACKGROUNDS, _BACKGROUND_TOL)

    offset = pixels - background.reshape(3, 1, 1, 1)  # (3, T, H, W)
    distance = offset.square().sum(0).sqrt()  # (T, H, W)
    foreground = distance > _FOREGROUND_MIN_DISTANCE  # (T, H, W)
    counts = foreground.sum(dim=(1, 2))  # (T,)
    if counts.min() < _MIN_OBJECT_PIXELS or counts.max() > _MAX_OBJECT_SHARE * height * width:
        return result

    # The core (pixels nearly as far from the background as the farthest) excludes anti-aliased and
    # chroma-blurred edges, which mix the shape's colour with the background's.
    reference = torch.quantile(distance[foreground], 0.9)
    core = foreground & (distance >= 0.7 * reference)  # (T, H, W)
    colour_rgb = pixels[:, core].median(dim=1).values  # (3,)
    colour = _nearest(colour_rgb, COLOURS, _COLOUR_TOL)  # reported only once the object proves single

    # Soft coverage: how far each pixel lies from the background towards the object's colour.
    direction = colour_rgb - background  # (3,)
    alpha = torch.einsum("cthw,c->thw", offset, direction) / direction.dot(direction)  # (T, H, W)
    alpha = alpha.clamp(0, 1)
    # Segment on 3x3 means so that isolated noisy pixels neither pass for the object nor stretch its box.
    inside = _mean3x3(alpha) > 0.5  # (T, H, W)
    rows, cols = inside.any(dim=2), inside.any(dim=1)  # (T, H), (T, W)
    if not (rows.any(dim=1).all() and cols.any(dim=1).all()):
        return result
    row_box, col_box = _box(rows), _box(cols)  # (T, H), (T, W)
    if (inside.sum(dim=(1, 2)) / (row_box.sum(dim=1) * col_box.sum(dim=1))).min() < _MIN_FILL:
        return result
    box = _widen(row_box)[:, :, None] & _widen(col_box)[:, None, :]  # (T, H, W), one pixel wider for the rim
    # A second object of another colour is invisible in alpha (which measures this colour only), but
    # not in the foreground: all of that must lie in this object's box.
    solid = _mean3x3(foreground.float()) > 0.5  # (T, H, W)
    if (solid & ~box).sum() > _MAX_STRAY * solid.sum():
        return result
    # Coverage counts only inside the box: summed over the frame, faint noise would add up to an area.
    alpha = alpha * box  # (T, H, W)

    # Every synthetic shape fills a square box, so the per-axis coverage profiles give its centre
    # and its half-extent (the larger side, since a shape cut by the border loses width).
    centre_y, length_y = _profile_extent(alpha.amax(dim=2))  # (T,), (T,)
    centre_x, length_x = _profile_extent(alpha.amax(dim=1))  # (T,), (T,)
    half = torch.maximum(length_x, length_y) / 2  # (T,)

    per_frame = []
    for shape in SHAPES:
        template = coverage(shape, centre_x, centre_y, half, (height, width),
                            supersample=_TEMPLATE_SUPERSAMPLE)  # (T, H, W)
        intersection = torch.minimum(alpha, template).sum(dim=(1, 2))  # (T,)
        union = torch.maximum(alpha, template).sum(dim=(1, 2))  # (T,)
        per_frame.append(intersection / union)
    per_frame = torch.stack(per_frame)  # (S, T)
    if by_frame:
        result["frame_shapes"] = [SHAPES[index] for index in per_frame.argmax(dim=0).tolist()]
    overlaps = per_frame.mean(dim=1)  # (S,)
    best = int(overlaps.argmax())
    if overlaps[best] < _MIN_SHAPE_IOU:
        return result  # a blob, not one of our shapes: its size and motion are not trustworthy either
    result["colour"], result["shape"] = colour, SHAPES[best]

    relative = float(half.median()) / min(height, width)
    if _SIZE_RANGE[0] <= relative <= _SIZE_RANGE[1]:
        result["size"] = "small" if relative < _SIZE_BOUNDARY else "large"

    if frames > 1:
        result["motion"] = _motion(float(centre_x[-1] - centre_x[0]) / width,
                                   float(centre_y[-1] - centre_y[0]) / height)
    return result


def _mean3x3(maps: torch.Tensor) -> torch.Tensor:
    """Each pixel's 3x3 neighbourhood mean (edges average what exists): (T, H, W) -> (T, H, W)."""
    return F.avg_pool2d(maps[:, None], 3, stride=1, padding=1, count_include_pad=False)[:, 0]


def _box(present: torch.Tensor) -> torch.Tensor:
    """The bounding interval of the True entries of each row of (T, N), as a mask (T, N)."""
    index = torch.arange(present.shape[1])
    last = torch.where(present, index, -1).amax(dim=1, keepdim=True)  # (T, 1)
    first = torch.where(present, index, present.shape[1]).amin(dim=1, keepdim=True)  # (T, 1)
    return (index >= first) & (index <= last)  # (T, N)


def _widen(mask: torch.Tensor) -> torch.Tensor:
    """A (T, N) interval mask grown by one entry at each end."""
    grown = mask.clone()
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    return grown


def _motion(shift_x: float, shift_y: float) -> str:
    """Motion word from the centre's displacement, as fractions of the frame (y grows downwards)."""
    main, other = max(abs(shift_x), abs(shift_y)), min(abs(shift_x), abs(shift_y))
    if main < _STATIC_BELOW:
        return "static"
    if main < _MOVING_ABOVE or other > _OFF_AXIS_RATIO * main:
        return UNKNOWN  # too slow to call, or diagonal: neither a clean direction nor still
    if abs(shift_x) >= abs(shift_y):
        return "right" if shift_x > 0 else "left"
    return "down" if shift_y > 0 else "up"


def evaluate(video: torch.Tensor | str | os.PathLike, prompt: str) -> dict[str, bool | None]:
    """Per attribute (colour, shape, size, motion): does the video show what the prompt names?

    None where the prompt names no value (e.g. motion for an image prompt); False where the video
    shows another value or nothing readable.
    """
    return compare(parse_prompt(prompt), describe(video))


def compare(named: Mapping[str, str | None], seen: Mapping[str, str | None]) -> dict[str, bool | None]:
    """`evaluate` from a parsed prompt and a description, for callers that keep both."""
    return {attribute: None if named[attribute] is None else seen[attribute] == named[attribute]
            for attribute in ATTRIBUTES}


def _matches(results: Sequence[Mapping[str, object]], attribute: str) -> list[bool]:
    """Match or not, for each result whose prompt names `attribute`."""
    return [bool(result[attribute]) for result in results if result.get(attribute) is not None]


def accuracy_table(results: Sequence[Mapping[str, object]]) -> str:
    """A text table of match rates per attribute over `results` (outputs of `evaluate`), one row for
    all results and one per distinct "group" value when results carry a "group" key."""
    groups: dict[str, list[Mapping[str, object]]] = {"all": list(results)}
    for result in results:
        if result.get("group") is not None:
            groups.setdefault(str(result["group"]), []).append(result)
    header = f"{'group':<12} {'n':>5} " + " ".join(f"{attribute:>8}" for attribute in ATTRIBUTES)
    lines = [header, "-" * len(header)]
    for group, members in groups.items():
        cells = []
        for attribute in ATTRIBUTES:
            scored = _matches(members, attribute)
            cells.append(f"{100 * sum(scored) / len(scored):7.1f}%" if scored else f"{'-':>8}")
        lines.append(f"{group:<12} {len(members):>5} " + " ".join(cells))
    return "\n".join(lines)


def _row_key(result: Mapping[str, object], by: Sequence[str]) -> tuple[str, ...]:
    """The values the result's prompt names for `by`, "-" where it names none: its row of a breakdown."""
    return tuple(str(result["named"][attribute] or "-") for attribute in by)


def breakdown_table(results: Sequence[Mapping[str, object]], by: Sequence[str]) -> str:
    """Where the misses are: one row per combination of the values the prompts name for `by` (e.g. size
    and shape: "small cross"), with its count and match rate per attribute, and what the misses of by[-1]
    were read as. Each result needs "named" (parse_prompt) and "seen" (describe) besides `evaluate`'s keys;
    results whose prompt names none of a `by` attribute fall in a "-" row."""
    unknown = [attribute for attribute in by if attribute not in ATTRIBUTES]
    if not by or unknown:
        raise ValueError(f"by={list(by)}: must name one or more of {list(ATTRIBUTES)}")
    rows: dict[tuple[str, ...], list[Mapping[str, object]]] = {}
    for result in results:
        rows.setdefault(_row_key(result, by), []).append(result)
    last = by[-1]
    width = max(len(" ".join(key)) for key in rows)
    header = f"{' '.join(by):<{width}} {'n':>5} " + " ".join(f"{attribute:>8}" for attribute in ATTRIBUTES)
    lines = [header + f"   {last} misread as", "-" * (len(header) + 20)]
    for key in sorted(rows):
        members = rows[key]
        cells = []
        for attribute in ATTRIBUTES:
            scored = _matches(members, attribute)
            cells.append(f"{sum(scored):>3}/{len(scored):<4}" if scored else f"{'-':>8}")
        misread = Counter(str(result["seen"][last]) for result in members if result.get(last) is False)
        readings = ", ".join(f"{reading} {count}" for reading, count in misread.most_common())
        lines.append(f"{' '.join(key):<{width}} {len(members):>5} " + " ".join(cells) + f"   {readings}")
    return "\n".join(lines)


def frame_table(results: Sequence[Mapping[str, object]], by: Sequence[str]) -> str:
    """Where in the clip the shape is lost: for each row of `by` values (as in breakdown_table), the share of
    its clips whose frame t alone reads the asked shape, for every frame t; below it the same over the clips
    whose shape was missed. A causal VAE that packs 4 frames in a latent frame shows its grid here: frames 0,
    4, 8, ... read right more often than those between. Each result needs "named" and "seen" with
    "frame_shapes" (describe(..., by_frame=True)); clips without a shape in the prompt or an object are left out."""
    rows: dict[tuple[str, ...], list[Mapping[str, object]]] = {}
    for result in results:
        if result["named"]["shape"] is not None and result["seen"].get("frame_shapes"):
            rows.setdefault(_row_key(result, by), []).append(result)
    if not rows:
        return "(no clip with a shape in its prompt and an object in its frames)"
    length = max(len(result["seen"]["frame_shapes"]) for members in rows.values() for result in members)
    width = max(len(" ".join(key)) for key in rows) + len(" missed")
    lines = [f"{' '.join(by):<{width}} {'n':>5} " + " ".join(f"{t:>3}" for t in range(length)) + "  (% of clips, frame t)"]
    lines.append("-" * len(lines[0]))
    for key in sorted(rows):
        for label, members in (("", rows[key]), (" missed", [r for r in rows[key] if r.get("shape") is False])):
            if not members:
                continue
            cells = []
            for t in range(length):
                readings = [r["seen"]["frame_shapes"][t] == r["named"]["shape"] for r in members
                            if t < len(r["seen"]["frame_shapes"])]
                cells.append(f"{round(100 * sum(readings) / len(readings)):>3}" if readings else f"{'-':>3}")
            lines.append(f"{' '.join(key) + label:<{width}} {len(members):>5} " + " ".join(cells))
    return "\n".join(lines)


def _sidecar(media: pathlib.Path) -> tuple[str, str | None] | None:
    """(prompt, group) from x.json or x.txt next to x.<ext>; None when neither names a prompt.

    x.json is either {"prompt": ..., "group": ...} or the sidecar generate.py writes, whose prompt sits
    under "request".
    """
    json_path, text_path = media.with_suffix(".json"), media.with_suffix(".txt")
    if json_path.is_file():
        meta = json.loads(json_path.read_text())
        request = meta.get("request") if isinstance(meta.get("request"), dict) else {}
        prompt = meta.get("prompt", request.get("prompt"))
        if prompt is None:
            return None
        return str(prompt), meta.get("group", request.get("group"))
    if text_path.is_file():
        return text_path.read_text().strip(), None
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m data.evaluate",
        description="Score generated synthetic-world media against their prompts from the pixels alone: "
                    "per attribute (colour, shape, size, motion), the share of files that show what the "
                    "prompt names. Each media file x.mp4 / x.png needs a sidecar x.txt (the prompt) or x.json "
                    '({"prompt": "...", "group": "heldout"}); groups get their own row.',
        epilog="example: python -m data.evaluate samples/   (files without a sidecar are skipped and counted)")
    parser.add_argument("folder", type=pathlib.Path, help="folder searched recursively for media files")
    parser.add_argument("--per-file", action="store_true", help="also print what was read from each file")
    parser.add_argument("--groups", nargs="+", metavar="GROUP",
                        help="score only files whose sidecar names one of these groups (e.g. seen heldout)")
    parser.add_argument("--by", nargs="+", choices=ATTRIBUTES, metavar="ATTRIBUTE",
                        help="also break the scores down by the values the prompts name for these attributes, "
                             f"in order (any of {', '.join(ATTRIBUTES)}; e.g. --by size shape: a row per small "
                             "cross, large square, ...) with what the misses of the last one were read as")
    parser.add_argument("--frames", action="store_true",
                        help="also print, per row of --by (default: shape), the share of clips whose frame t alone "
                             "reads the asked shape, for every t, and the same over the clips whose shape was missed")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # small clips one after another: intra-op threads cost more than they give
    media = sorted(path for path in args.folder.rglob("*") if path.suffix.lower() in MEDIA_SUFFIXES)
    results, skipped = [], 0
    for path in media:
        sidecar = _sidecar(path)
        if sidecar is None:
            skipped += 1
            continue
        prompt, group = sidecar
        if args.groups and group not in args.groups:
            continue
        try:
            seen = describe(path, by_frame=args.frames)
        except VideoReadError as err:  # an unreadable output shows nothing the prompt asked for
            print(f"unreadable, scored as showing nothing: {err}")
            seen = dict.fromkeys((*ATTRIBUTES, "background"), UNKNOWN)
        named = parse_prompt(prompt)
        results.append({**compare(named, seen), "group": group, "named": named, "seen": seen})
        if args.per_file:
            print(f"{path}: {prompt!r} -> {seen}")
    if not results:
        wanted = f" in groups {args.groups}" if args.groups else ""
        parser.error(f"no media file with a .txt or .json sidecar{wanted} under {args.folder}")
    print(accuracy_table(results))
    if args.by:
        print()
        print(breakdown_table(results, args.by))
    if args.frames:
        print()
        print(frame_table(results, args.by or ("shape",)))
    if skipped:
        print(f"({skipped} media files without a sidecar prompt were skipped)")


if __name__ == "__main__":
    main()
