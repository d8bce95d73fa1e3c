"""The generation pipeline: a model folder (VAE, DiT, text encoder, diffusion config) that makes videos.

    pipe = Pipeline.from_pretrained("weights/demo")
    video = pipe("a red circle moving left on a black background", frames=17, seed=0)  # (N, 3, T, H, W)
    video = pipe("a red circle", mode="i2v", image="still.png")

A call is a `GenerationRequest` (dit/modes.py). The pipeline fills the request's unset fields from the
folder's defaults, checks the size, encodes the prompts once, then per sample: draws the noise from the
sample's seed, builds the condition of the mode (clean latents of the input media, placed by
dit/conditioning.py), samples the latents (dit/sampling.py) and decodes them with the VAE.

The model folder:

    MODEL_DIR/dit/{model.safetensors,config.json}    DiT.save_pretrained
    MODEL_DIR/vae/{model.safetensors,config.json}    CausalVAE.save_pretrained
    MODEL_DIR/text_encoder/                          optional; else pipeline.json names the encoder
    MODEL_DIR/pipeline.json                          one flat JSON object: the DiffusionConfig fields,
                                                     "text_encoder", and the GenerationDefaults fields

`save_pipeline_folder` writes one (the tests use it for tiny random models). With `offload=True` each
model sits on the CPU and visits the device only while it works, so the largest model alone sets the
peak device memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from data.atomic import atomic_path
from dit.diffusion import DiffusionConfig
from dit.inputs import load_clip, load_still
from dit.modes import (
    GenerationDefaults,
    GenerationRequest,
    InvalidRequest,
    SizeRules,
    expand_request,
    parse_keyframe,
    resolve_request,
)

if TYPE_CHECKING:  # the models load lazily, so importing this module stays light
    from dit.model import DiT
    from dit.text_encoder import TextEncoder
    from vae.model import CausalVAE

PIPELINE_FILE = "pipeline.json"


@dataclass
class PipelineConfig:
    """pipeline.json: the diffusion process, the text encoder's name and the generation defaults."""

    diffusion: DiffusionConfig
    """The process the DiT was trained with (dit/diffusion.py)."""
    text_encoder: str = "default"
    """Text encoder: "default" (embedded), a hub id or a folder; MODEL_DIR/text_encoder/ wins if present."""
    defaults: GenerationDefaults = dataclasses.field(default_factory=GenerationDefaults)
    """Settings for requests that leave them unset."""

    def to_json_dict(self) -> dict:
        """The flat JSON object of pipeline.json."""
        return {**dataclasses.asdict(self.diffusion), "text_encoder": self.text_encoder,
                **dataclasses.asdict(self.defaults)}

    @classmethod
    def from_json_dict(cls, values: dict, *, source: str = PIPELINE_FILE) -> PipelineConfig:
        diffusion_keys = {f.name for f in dataclasses.fields(DiffusionConfig)}
        default_keys = {f.name for f in dataclasses.fields(GenerationDefaults)}
        unknown = sorted(set(values) - diffusion_keys - default_keys - {"text_encoder"})
        if unknown:
            valid = sorted(diffusion_keys | default_keys | {"text_encoder"})
            raise ValueError(f"{source}: unknown keys {unknown}; valid keys are {valid}")
        try:
            return cls(diffusion=DiffusionConfig(**{k: v for k, v in values.items() if k in diffusion_keys}),
                       text_encoder=values.get("text_encoder", "default"),
                       defaults=GenerationDefaults(**{k: v for k, v in values.items() if k in default_keys}))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: {err}") from None


def read_pipeline_config(folder: str | os.PathLike) -> PipelineConfig:
    """Read MODEL_DIR/pipeline.json; a folder that is not a model folder is a clear error."""
    folder = Path(folder)
    missing = [name for name in ("dit/config.json", "vae/config.json", PIPELINE_FILE) if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} is not a model folder: {', '.join(missing)} missing (a model folder "
                                "holds dit/, vae/ and pipeline.json, as `python train.py --export RUN --out DIR` "
                                "writes it)")
    return PipelineConfig.from_json_dict(json.loads((folder / PIPELINE_FILE).read_text()),
                                         source=str(folder / PIPELINE_FILE))


def read_size_rules(folder: str | os.PathLike) -> SizeRules:
    """The valid sizes of a model folder from its configs alone, without loading any weights."""
    from dit.model import DiTConfig
    from vae.model import VAEConfig

    folder = Path(folder)
    vae_cfg = VAEConfig.from_json(folder / "vae" / "config.json")
    dit_cfg = DiTConfig(**json.loads((folder / "dit" / "config.json").read_text()))
    return SizeRules(vae_cfg.temporal_factor, vae_cfg.spatial_factor, tuple(dit_cfg.patch_size))


def resolve_for_model(request: GenerationRequest, config: PipelineConfig, rules: SizeRules) -> GenerationRequest:
    """`resolve_request` with the folder's defaults, plus a check that the sampler suits the process."""
    from dit.diffusion import build_process
    from dit.sampling import SAMPLERS

    resolved = resolve_request(request, defaults=config.defaults, rules=rules)
    process = type(build_process(config.diffusion))
    suitable = sorted(name for name, kind in SAMPLERS.items() if kind is process)
    if resolved.sampler not in suitable:
        raise InvalidRequest(f"sampler={resolved.sampler!r}: this model's process is {config.diffusion.process!r}; "
                             f"use one of {suitable}")
    if resolved.shift is not None and config.diffusion.process != "flow":
        raise InvalidRequest(f"shift={resolved.shift}: only flow-matching models have a timestep shift; this "
                             f"model's process is {config.diffusion.process!r}")
    return resolved


def save_pipeline_folder(folder: str | os.PathLike, *, dit: DiT, vae: CausalVAE, diffusion: DiffusionConfig,
                         text_encoder: str = "default",
                         defaults: GenerationDefaults | None = None) -> Path:
    """Write a model folder that `Pipeline.from_pretrained` loads (DiT, VAE, pipeline.json)."""
    folder = Path(folder)
    dit.save_pretrained(folder / "dit")
    vae.save_pretrained(folder / "vae")
    config = PipelineConfig(diffusion=diffusion, text_encoder=text_encoder, defaults=defaults or GenerationDefaults())
    write_json_atomic(folder / PIPELINE_FILE, config.to_json_dict())
    return folder


def random_pipeline_folder(folder: str | os.PathLike, *, text_encoder: str = "default",
                           defaults: GenerationDefaults | None = None, diffusion: DiffusionConfig | None = None,
                           seed: int = 0) -> Path:
    """An untrained model folder from the "debug" presets, for tests and smoke runs; deterministic by seed.

    A fresh DiT is zero-initialised on its adaLN gates and head, so it predicts 0 whatever its input;
    every DiT weight gets a small seeded perturbation so the output depends on noise, text and condition.
    """
    from dit.model import DiT, DiTConfig
    from dit.text_encoder import TextEncoder
    from vae.model import CausalVAE, VAEConfig

    torch.manual_seed(seed)
    vae = CausalVAE(VAEConfig.from_preset("debug"))
    text_dim = TextEncoder.from_pretrained(text_encoder).dim
    dit = DiT(DiTConfig.from_preset("debug", in_channels=vae.cfg.latent_channels,
                                    out_channels=vae.cfg.latent_channels, text_dim=text_dim))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in dit.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=generator))
    return save_pipeline_folder(folder, dit=dit, vae=vae, diffusion=diffusion or DiffusionConfig.from_preset("debug"),
                                text_encoder=text_encoder, defaults=defaults)


def write_json_atomic(path: Path, values: dict) -> Path:
    """Write JSON under a temporary name in the same folder, then rename: never a partial file."""
    with atomic_path(path) as temp:
        temp.write_text(json.dumps(values, indent=2) + "\n")
    return path


@dataclass
class Sample:
    """One generated output and the exact request that makes it again."""

    video: torch.Tensor
    """(3, T, H, W) float32 in [-1, 1], on the CPU."""
    latents: torch.Tensor
    """(C, T', H', W') the sampled latents, on the CPU."""
    request: GenerationRequest
    """Resolved, num_samples=1, this sample's own seed (and alpha for interpolate)."""
    seconds: float
    """Wall time of this sample: condition, sampling and decoding."""


class Pipeline:
    """VAE + DiT + text encoder + diffusion config: a request in, decoded videos out."""

    def __init__(self, *, dit: DiT, vae: CausalVAE, text_encoder: TextEncoder, config: PipelineConfig,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, offload: bool = False,
                 vae_tiling: bool = False):
        if vae.cfg.latent_channels != dit.cfg.in_channels:
            raise ValueError(f"the VAE makes {vae.cfg.latent_channels} latent channels but the DiT takes "
                             f"in_channels={dit.cfg.in_channels}: they are not from the same model")
        if text_encoder.dim != dit.cfg.text_dim:
            raise ValueError(f"text encoder {text_encoder.name!r} has width {text_encoder.dim} but the DiT takes "
                             f"text_dim={dit.cfg.text_dim}: pipeline.json names the wrong encoder")
        self.dit, self.vae, self.text_encoder = dit.eval(), vae.eval(), text_encoder
        self.config = config
        self.device, self.dtype = torch.device(device), dtype
        self.offload, self.vae_tiling = offload, vae_tiling
        self.size_rules = SizeRules(vae.cfg.temporal_factor, vae.cfg.spatial_factor, tuple(dit.cfg.patch_size))
        home = torch.device("cpu") if offload else self.device
        self.dit.to(home)
        self.vae.to(home)
        self.text_encoder.to(home)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, offload: bool = False,
                        vae_tiling: bool = False) -> Pipeline:
        from dit.model import DiT
        from dit.text_encoder import TextEncoder
        from vae.model import CausalVAE

        folder = Path(folder)
        config = read_pipeline_config(folder)
        home = "cpu" if offload else device
        dit = DiT.from_pretrained(folder / "dit", device=home, dtype=dtype)
        vae = CausalVAE.from_pretrained(folder / "vae", device=home, dtype=dtype)
        # The embedding feeds a float32 island in the DiT; the encoder runs in float32 and stays small.
        encoder_source = folder / "text_encoder" if (folder / "text_encoder").is_dir() else config.text_encoder
        text_encoder = TextEncoder.from_pretrained(str(encoder_source), device=home)
        return cls(dit=dit, vae=vae, text_encoder=text_encoder, config=config, device=device, dtype=dtype,
                   offload=offload, vae_tiling=vae_tiling)

    # -- requests ------------------------------------------------------------------------------------

    def resolve(self, request: GenerationRequest) -> GenerationRequest:
        """Fill every unset field from the defaults and check sizes; the result reproduces exactly."""
        return resolve_for_model(request, self.config, self.size_rules)

    # -- generation ----------------------------------------------------------------------------------

    def __call__(self, prompt: str = "", *, progress: bool = False, **options) -> torch.Tensor:
        """Generate from keyword options (the GenerationRequest fields): (N, 3, T, H, W) in [-1, 1]."""
        samples = self.generate(GenerationRequest(prompt=prompt, **options), progress=progress)
        return torch.stack([s.video for s in samples])  # (N, 3, T, H, W)

    @torch.no_grad()
    def generate(self, request: GenerationRequest, *, progress: bool = True) -> list[Sample]:
        """Every output of a request, one at a time (so memory does not grow with num_samples)."""
        resolved = self.resolve(request)
        text = self._encode_text([resolved.prompt, resolved.negative_prompt])
        samples = []
        for one in expand_request(resolved):
            start = time.perf_counter()
            latents = self._sample_latents(one, text, progress=progress)  # (1, C, T', H', W')
            video = self.decode(latents)  # (1, 3, T, H, W)
            samples.append(Sample(video=video[0].float().cpu(), latents=latents[0].float().cpu(), request=one,
                                  seconds=time.perf_counter() - start))
        return samples

    # -- the steps of one sample -----------------------------------------------------------------------

    @contextlib.contextmanager
    def _working(self, module) -> Iterator[None]:
        """With offload, bring `module` to the device for the duration and send it back after."""
        if not self.offload:
            yield
            return
        module.to(self.device)
        try:
            yield
        finally:
            module.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _encode_text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        with self._working(self.text_encoder):
            hidden, mask = self.text_encoder.encode(prompts)  # (B, S, Dt), (B, S)
        return hidden.to(self.device), mask.to(self.device)

    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """(3, T, H, W) in [-1, 1] -> normalised latents (1, C, T', H', W')."""
        with self._working(self.vae):
            x = pixels[None].to(self.device, self.dtype)  # (1, 3, T, H, W)
            return self.vae.encode(x, tiling=self.vae_tiling).float()  # (1, C, T', H', W')

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, C, T', H', W'), e.g. a Sample's, -> (B, 3, T, H, W) in [-1, 1], as generate
        decodes them (on the pipeline's device and dtype, with its offload and tiling)."""
        with self._working(self.vae):
            return self.vae.decode(latents.to(self.device, self.dtype), tiling=self.vae_tiling)

    def _denoiser(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                  x0_prev: torch.Tensor | None = None, frame_local: bool = False):
        # The sampler keeps its state in float32; the DiT computes in its own dtype (x0_prev follows x there).
        return self.dit(x.to(self.dtype), t, text, text_mask, x0_prev, frame_local)  # (B, C, T', H', W')

    def _noise(self, request: GenerationRequest, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Generator]:
        """The initial noise from the seed, and the generator that goes on to draw the sampler's noise.

        Drawn on the CPU so a seed means the same on every device. One stream for both, so a stochastic
        sampler's first step does not reuse the initial noise (a second generator on the same seed would).
        """
        from dit.conditioning import slerp

        generator = torch.Generator().manual_seed(request.seed)
        noise = torch.randn(shape, generator=generator)  # (1, C, T', H', W')
        if request.mode == "interpolate":
            other = torch.randn(shape, generator=torch.Generator().manual_seed(request.seed2))
            noise = slerp(noise, other, request.alpha)
        return noise.to(self.device), generator

    def _condition(self, request: GenerationRequest, latent_frames: int, text, *, progress: bool):
        """The clean latents the mode keeps fixed, as a Condition (or None), and SDEdit's source latents."""
        from dit import conditioning

        r, size = request, {"height": request.height, "width": request.width}
        if r.mode == "i2v":
            image = self._encode_pixels(load_still(r.image, **size))  # (1, C, 1, H', W')
            return conditioning.image_to_video(image, latent_frames=latent_frames), None
        if r.mode == "extend":
            forward = r.direction == "forward"
            clip = load_clip(r.video, r.context_frames, fps=r.fps, from_end=forward, **size)  # (3, T, H, W)
            latents = self._encode_pixels(clip)  # (1, C, K, H', W')
            build = conditioning.extend_forward if forward else conditioning.extend_backward
            return build(latents, latents.shape[2], latent_frames=latent_frames), None
        if r.mode == "loop":
            if r.image is not None:
                still = self._encode_pixels(load_still(r.image, **size))  # (1, C, 1, H', W')
            else:  # no still given: make one from the prompt with the same seed, then loop through it
                first = dataclasses.replace(r, mode="t2i", frames=1, image=None)
                still = self._sample_latents(first, text, progress=progress)  # (1, C, 1, H', W')
            return conditioning.loop(still, latent_frames=latent_frames), None
        if r.mode == "keyframes":
            positions, stills = [], []
            for item in r.keyframes:
                frame, path = parse_keyframe(item)
                positions.append(conditioning.latent_index_of_pixel_frame(frame, self.size_rules.temporal_factor))
                stills.append(self._encode_pixels(load_still(path, **size)))  # (1, C, 1, H', W')
            frames = torch.cat(stills, dim=2)  # (1, C, K, H', W')
            return conditioning.keyframes(frames, positions, latent_frames=latent_frames), None
        if r.mode == "transition":
            head = self._encode_pixels(load_clip(r.video, r.context_frames, fps=r.fps, from_end=True, **size))
            tail = self._encode_pixels(load_clip(r.end_video, r.context_frames, fps=r.fps, from_end=False, **size))
            return conditioning.transition(head, tail, head.shape[2], latent_frames=latent_frames), None
        if r.mode == "v2v":
            source = load_clip(r.video, r.frames, fps=r.fps, from_end=False, **size)  # (3, T, H, W)
            return None, self._encode_pixels(source)  # (1, C, T', H', W')
        return None, None  # t2v, t2i, interpolate: nothing is fixed

    def _sample_latents(self, request: GenerationRequest, text, *, progress: bool) -> torch.Tensor:
        from dit.diffusion import build_process
        from dit.sampling import sample

        latent_grid = self.vae.latent_shape(request.frames, request.height, request.width)  # (T', H', W')
        noise, generator = self._noise(request, (1, self.dit.cfg.in_channels, *latent_grid))  # (1, C, T', H', W')
        condition, source = self._condition(request, latent_grid[0], text, progress=progress)
        diffusion = self.config.diffusion
        if request.shift is not None:
            diffusion = dataclasses.replace(diffusion, shift=request.shift, dynamic_shift=False)
        hidden, mask = text  # row 0: the prompt, row 1: the negative prompt
        with self._working(self.dit):
            return sample(
                self._denoiser, noise, process=build_process(diffusion), sampler=request.sampler,
                steps=request.steps, text=hidden[:1], text_mask=mask[:1], neg_text=hidden[1:], neg_mask=mask[1:],
                guidance_scale=request.guidance_scale, guidance_rescale=request.guidance_rescale,
                cond_latents=None if condition is None else condition.latents,
                cond_mask=None if condition is None else condition.mask,
                init_latents=source, strength=request.strength,
                generator=generator, progress=progress,
                patch_size=tuple(self.dit.cfg.patch_size), self_cond=self.dit.cfg.self_cond,
                temporal_guidance=request.temporal_guidance,
                temporal_guidance_start=request.temporal_guidance_start,
                cfg_zero_star=request.cfg_zero_star, zero_init_steps=request.zero_init_steps,
            )  # (1, C, T', H', W')
