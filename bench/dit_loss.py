"""How well does a trained DiT denoise? Its flow-matching loss at fixed noise levels on cached clips.

The training log's loss mixes noise levels drawn at random; this draws one noise tensor per clip
(fixed seed) and evaluates the model at each noise level sigma on the same clips, so two runs on the
same cache compare number for number. Used to choose the demo recipe's DiT settings (docs/demo.md).

    python -m bench.dit_loss MODEL_FOLDER --cache outputs/demo/cache [--clips 200]
    python -m bench.dit_loss MODEL_FOLDER --cache outputs/demo/cache --probe    # + which words it reads
    python -m bench.dit_loss MODEL_FOLDER --cache outputs/demo/cache --probe --by-level   # + at each level alone

`--probe` asks whether the model uses each attribute word of the demo's captions (colour, shape, size,
motion): it denoises every clip under captions that differ in that word only and picks the caption with
the lowest loss (the diffusion model as a classifier, Li et al. 2023). Chance is one over the number of
values (colour 1/6, shape 1/4, size 1/2, motion 1/5); a model that ignores a word scores chance on it
whatever its samples look like, so the probe separates settings long before the samples do. With
`--by-level` it also scores each of its noise levels alone (from the same losses): where in the
denoising a word is read.

MODEL_FOLDER is an export (holding dit/ and pipeline.json) or a DiT folder. Flow-matching models only:
the loss is the mean square error of the predicted velocity (noise - x0) per latent element; an x0-
predicting model (pipeline.json's flow_prediction) has its output converted to a velocity first.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dit.diffusion import FlowMatching

SIGMAS = (0.2, 0.4, 0.6, 0.8, 0.9, 0.97)
# Noise levels of the probe: low noise decides shape, high noise layout and motion; their losses add.
PROBE_SIGMAS = (0.3, 0.5, 0.7, 0.85, 0.95)


@torch.no_grad()
def flow_loss_by_sigma(model, latents: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor, *,
                       sigmas=SIGMAS, seed: int = 0, batch: int = 50,
                       process: FlowMatching | None = None) -> dict[float, float]:
    """Latents (N, C, T', H', W'), text (N, S, Dt), mask (N, S) -> {sigma: mean velocity MSE}. `process` (the
    model's, default a velocity model) gives noising, target and output conversion only: its shift plays no
    part at a given sigma."""
    process = process or FlowMatching()
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
    losses = {}
    for sigma in sigmas:
        t = torch.full((latents.shape[0],), sigma * process.num_timesteps)
        x_t = process.add_noise(latents, noise, t)
        target = process.training_target(latents, noise, t)
        total = 0.0
        for start in range(0, latents.shape[0], batch):
            part = slice(start, start + batch)
            pred = process.as_target(model(x_t[part], t[part], text[part], text_mask[part]), x_t[part], t[part])
            total += float((pred - target[part]).square().mean(dim=(1, 2, 3, 4)).sum())
        losses[sigma] = total / latents.shape[0]
    return losses


def probe_captions(named: dict[str, str | None], attribute: str) -> tuple[list[str], list[str]]:
    """The candidate values of `attribute` and one caption for each, all else as `named` (parse_prompt's
    output for a synthetic-world caption), in the first training template that names what `named` does."""
    from data.synthetic import CLIP_TEMPLATES, COLOURS, MOTION_PHRASES, MOTIONS, SHAPES, SIZES

    candidates = {"colour": list(COLOURS), "shape": list(SHAPES), "size": list(SIZES), "motion": list(MOTIONS)}[attribute]
    template = CLIP_TEMPLATES[0] if named["size"] is not None else CLIP_TEMPLATES[1]  # [1] names no size
    captions = []
    for value in candidates:
        words = {**named, attribute: value}
        captions.append(template.format(**{**words, "motion": MOTION_PHRASES[words["motion"]][0]}))
    return candidates, captions


@torch.no_grad()
def attribute_probe(model, latents: torch.Tensor, texts: list[str], encoder, *, sigmas=PROBE_SIGMAS, seed: int = 0,
                    process: FlowMatching | None = None, by_level: bool = False) -> dict[str, dict]:
    """Latents (N, C, T', H', W') of synthetic-world clips and their captions -> per attribute, the share
    of clips whose own value gives the lowest loss summed over `sigmas` (same noise for every candidate),
    and how many clips named it; with `by_level`, also that share at each sigma alone ("by_sigma"), from
    the same losses."""
    from data.evaluate import ATTRIBUTES, parse_prompt

    process = process or FlowMatching()
    generator = torch.Generator().manual_seed(seed)
    hits = {attribute: 0 for attribute in ATTRIBUTES}
    level_hits = {attribute: torch.zeros(len(sigmas)) for attribute in ATTRIBUTES}  # (K,) each
    counts = {attribute: 0 for attribute in ATTRIBUTES}
    t = torch.tensor([sigma * process.num_timesteps for sigma in sigmas])  # (K,)
    for latent, text in zip(latents, texts, strict=True):
        named = parse_prompt(text)
        noise = torch.randn((len(sigmas), *latent.shape), generator=generator)  # (K, C, T', H', W')
        x_t = process.add_noise(latent.expand_as(noise), noise, t)
        target = process.training_target(latent.expand_as(noise), noise, t)
        for attribute in ATTRIBUTES:
            if named[attribute] is None or named["background"] is None:
                continue
            candidates, captions = probe_captions(named, attribute)
            hidden, mask = encoder.encode(captions)  # (V, S, Dt), (V, S)
            v, k = len(candidates), len(sigmas)
            x_all, t_all = x_t.repeat(v, 1, 1, 1, 1), t.repeat(v)  # (V*K, C, T', H', W'), (V*K,): candidate-major
            pred = model(x_all, t_all, hidden.repeat_interleave(k, 0), mask.repeat_interleave(k, 0))
            pred = process.as_target(pred, x_all, t_all)  # (V*K, C, T', H', W')
            loss = (pred - target.repeat(v, 1, 1, 1, 1)).square().mean(dim=(1, 2, 3, 4)).reshape(v, k)  # (V, K)
            own = candidates.index(named[attribute])
            hits[attribute] += int(int(loss.sum(1).argmin()) == own)
            level_hits[attribute] += loss.argmin(0) == own  # (K,)
            counts[attribute] += 1
    scores = {}
    for attribute in ATTRIBUTES:
        clips = max(counts[attribute], 1)
        scores[attribute] = {"accuracy": round(hits[attribute] / clips, 3), "clips": counts[attribute]}
        if by_level:
            scores[attribute]["by_sigma"] = {str(sigma): round(float(n) / clips, 3)
                                             for sigma, n in zip(sigmas, level_hits[attribute], strict=True)}
    return scores


def main(argv: list[str] | None = None) -> None:
    from data.cache import CachedLatentDataset, collate_latents
    from dit.diffusion import build_process
    from dit.model import DiT
    from dit.pipeline import read_pipeline_config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="an export folder (with dit/) or a DiT folder")
    parser.add_argument("--cache", type=Path, required=True, help="a `python -m data.cache` folder")
    parser.add_argument("--clips", type=int, default=200, help="first N multi-frame samples of the cache")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise")
    parser.add_argument("--probe", action="store_true",
                        help="also score which attribute words the model reads (synthetic-world captions)")
    parser.add_argument("--by-level", action="store_true", help="with --probe: also probe each noise level alone")
    args = parser.parse_args(argv)

    folder = args.model / "dit" if (args.model / "dit").is_dir() else args.model
    if not (folder / "config.json").exists():
        raise SystemExit(f"{args.model}: no DiT config.json here or in dit/; pass an export or a DiT folder")
    model = DiT.from_pretrained(folder).eval()
    # An export says what the model outputs in pipeline.json; a bare DiT folder has none: a velocity model.
    process = build_process(read_pipeline_config(args.model).diffusion) if folder != args.model else None
    if process is not None and not isinstance(process, FlowMatching):
        raise SystemExit(f"{args.model}: a {type(process).__name__} model; this loss is for flow matching only")
    dataset = CachedLatentDataset(args.cache)
    # The bucket tells a clip from a still without reading the sample from its shard.
    clips = [i for i, bucket in enumerate(dataset.buckets) if bucket is not None and bucket.num_frames > 1]
    if not clips:
        raise SystemExit(f"{args.cache}: no multi-frame samples in this cache")
    batch = collate_latents([dataset[i] for i in clips[: args.clips]])
    losses = flow_loss_by_sigma(model, batch["latents"].float(), batch["text_hidden"].float(), batch["text_mask"],
                                seed=args.seed, process=process)
    report = {"clips": len(batch["latents"]), "loss_by_sigma": {str(k): round(v, 4) for k, v in losses.items()},
              "mean": round(sum(losses.values()) / len(losses), 4)}
    if args.probe:
        from dit.text_encoder import TextEncoder

        encoder = TextEncoder.from_pretrained(json.loads((args.cache / "cache.json").read_text())["text_encoder"])
        report["probe"] = attribute_probe(model, batch["latents"].float(), batch["text"], encoder,
                                          seed=args.seed, process=process, by_level=args.by_level)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
