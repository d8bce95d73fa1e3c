"""Train the VAE or the DiT: `python train.py --config configs/demo/dit.yaml [key=value ...]`.

One plain process on a CPU needs no launcher; `deepspeed train.py ...` or `torchrun ...` runs many
(gloo on CPU, NCCL on GPUs). Every run, one process or many, goes through the DeepSpeed engine: one code
path, costing about 0.4 s at start-up and nothing measurable per step on a CPU (docs/training.md).

Top to bottom: the loop's config; the `Task` protocol (what differs between models: how a batch becomes
a loss); the `Trainer` (engine, EMA, NaN skipping, signals, logs, checkpoints, sequence parallelism);
the full `TrainConfig`; the export to a generate.py model folder; the command line. The tasks themselves
live with their models: `dit/training.py` and `vae/training.py`.

    python train.py --config configs/demo/dit.yaml                 # train
    python train.py --config configs/demo/dit.yaml --resume latest # continue the same trajectory
    python train.py --export outputs/dit-demo --out models/demo    # EMA weights -> generate.py folder

Faults. A NaN/inf loss skips its micro-batch on every rank (the flag is all-reduced) and is counted;
after `max_consecutive_nonfinite` in a row the run saves and stops with an error. SIGTERM/SIGINT save a
checkpoint at the next step boundary and exit with 128 + signal. Process groups have a timeout, so a
crashed rank makes the others fail instead of hanging. Checkpoints are atomic (checkpoint.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

import checkpoint as ckpt
from config import ConfigError, config_to_yaml, load_config
from data.buckets import BucketConfig
from dit import parallel
from dit.conditioning import MaskSamplerConfig
from dit.diffusion import DiffusionConfig
from dit.model import DiTConfig
from vae.losses import VAELossConfig
from vae.model import VAEConfig

TASKS = ("dit", "vae")


# ----------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------
@dataclass
class OptimConfig:
    lr: float = 1e-4
    """Peak learning rate of AdamW, reached at the end of warm-up."""
    betas: tuple[float, ...] = (0.9, 0.999)
    """AdamW (beta1, beta2)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 0
    """Linear warm-up from 0 to `lr` over this many optimizer steps."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio on the last step."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    lr_scales: dict[str, float] = field(default_factory=dict)
    """Learning-rate multipliers by parameter name: {regex: scale}, the first pattern `re.search` finds in a
    name wins, other parameters get 1; 0 freezes. E.g. {"decoder.*time_conv": 30} for the VAE decoder's time
    resamplers, which a stills-only stage never trained. Every pattern must match some parameter."""

    def __post_init__(self) -> None:
        for pattern, scale in self.lr_scales.items():
            if not scale >= 0:
                raise ValueError(f"lr_scales[{pattern!r}]={scale}: must be >= 0")
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"lr_scales: {pattern!r} is not a regular expression ({err})") from None
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr}: must be > 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas={self.betas}: must be two values in [0, 1)")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps}: must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio}: must be in [0, 1]")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError(f"grad_clip={self.grad_clip}, weight_decay={self.weight_decay}: must be >= 0")


@dataclass
class ParallelConfig:
    zero_stage: int = 0
    """DeepSpeed ZeRO stage: 0 (plain data parallel), 1 (optimizer), 2 (+gradients), 3 (+parameters)."""
    precision: str = "fp32"
    """'fp32', 'bf16' or 'fp16'; 16-bit needs zero_stage >= 1 (free on one GPU, see __post_init__)."""
    micro_batch_size: int = 1
    """Samples per rank per micro-step (bucketed data: the DeepSpeed bookkeeping value, batches may vary)."""
    grad_accum_steps: int = 1
    """Micro-steps accumulated into one optimizer step."""
    sp_size: int = 1
    """Ulysses sequence-parallel degree: ranks that share one sample's tokens (DiT only); must divide num_heads,
    every batch's token count and, with per-frame timesteps, its token frames (docs/training.md)."""
    deepspeed_config: str | None = None
    """A DeepSpeed JSON file merged over the config our YAML implies (its values win)."""
    timeout_s: float = 600.0
    """Collective timeout: a crashed or stuck rank makes every other rank fail after at most this long."""

    def __post_init__(self) -> None:
        if self.zero_stage not in parallel.ZERO_STAGES:
            raise ValueError(f"zero_stage={self.zero_stage}: must be one of {parallel.ZERO_STAGES}")
        if self.precision not in parallel.PRECISIONS:
            raise ValueError(f"precision={self.precision!r}: must be one of {parallel.PRECISIONS}")
        if self.precision != "fp32" and self.zero_stage == 0:
            # DeepSpeed's stage-0 16-bit optimizer keeps flat fp32 copies with no per-parameter mapping, so
            # checkpoints could not gather its state; ZeRO-1 on one GPU shards nothing and costs nothing.
            raise ValueError(f"precision={self.precision!r} with zero_stage=0: 16-bit training needs zero_stage >= 1")
        for name in ("micro_batch_size", "grad_accum_steps", "sp_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s={self.timeout_s}: must be > 0")


@dataclass
class CheckpointConfig:
    every: int = 1000
    """Save every this many optimizer steps (and always at the end); 0 = only at the end."""
    keep: int = 3
    """Keep the newest this many checkpoints."""
    export_at_end: bool = True
    """Write the generation folder (RUN_DIR/export) from the final checkpoint."""

    def __post_init__(self) -> None:
        if self.every < 0 or self.keep < 1:
            raise ValueError(f"every={self.every}, keep={self.keep}: need every >= 0 and keep >= 1")


@dataclass
class LogConfig:
    every: int = 10
    """Write scalars (TensorBoard, JSONL) every this many optimizer steps."""
    tensorboard: bool = True
    """Also write TensorBoard event files to RUN_DIR/tb."""
    progress_bar: bool = True
    """Show a tqdm bar on rank 0."""
    media_every: int = 0
    """DiT: sample videos from `sample_prompts`; VAE: log reconstructions; every N steps (0 = off)."""
    sample_prompts: list[str] = field(default_factory=lambda: ["a red circle moves right"])
    """Fixed prompts sampled by the DiT task every `media_every` steps."""
    sample_steps: int = 20
    """Sampler steps for those samples."""

    def __post_init__(self) -> None:
        if self.every < 1 or self.media_every < 0 or self.sample_steps < 1:
            raise ValueError(f"every={self.every}, media_every={self.media_every}, sample_steps="
                             f"{self.sample_steps}: need every >= 1, media_every >= 0, sample_steps >= 1")


@dataclass
class EMAConfig:
    decay: float = 0.9999
    """EMA decay per optimizer step; 0 turns EMA off (export then uses the raw weights)."""
    start_step: int = 0
    """EMA copies the weights until this step, then starts averaging."""

    def __post_init__(self) -> None:
        if not 0 <= self.decay < 1:
            raise ValueError(f"decay={self.decay}: must be in [0, 1)")
        if self.start_step < 0:
            raise ValueError(f"start_step={self.start_step}: must be >= 0")


@dataclass
class LoopConfig:
    """Everything the training loop needs; the task sections (model, data) are in `TrainConfig`."""

    run_dir: str = "outputs/run"
    """Where checkpoints, logs, samples and the export go."""
    seed: int = 0
    """Seeds model init, data order and every noise draw (derived per step, so resume is exact)."""
    steps: int = 1000
    """Optimizer steps to train."""
    max_consecutive_nonfinite: int = 10
    """Stop (after saving) when this many micro-batches in a row have a NaN/inf loss."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW and its schedule."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """DeepSpeed: ZeRO, precision, accumulation, sequence parallelism."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint cadence and retention."""
    log: LogConfig = field(default_factory=LogConfig)
    """Logging and periodic media."""
    ema: EMAConfig = field(default_factory=EMAConfig)
    """Exponential moving average of the weights."""
    compile: bool = False
    """torch.compile the model in place (nn.Module.compile, so its state dict keeps its names). Each new
    batch shape compiles on its first step, and a compiled DiT keeps padded text (masked) instead of
    trimming it. For the demo DiT on 2 CPU cores it does not pay: 4 min of compiling, then 83 ms per
    step against eager's 77 (docs/demo.md); it is for large models on GPUs (untested there yet)."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps={self.steps}: must be >= 1")
        if self.max_consecutive_nonfinite < 1:
            raise ValueError(f"max_consecutive_nonfinite={self.max_consecutive_nonfinite}: must be >= 1")


# ----------------------------------------------------------------------------------------------------
# What is trained: a task turns batches into a loss
# ----------------------------------------------------------------------------------------------------
class Task(Protocol):
    """The part of training that differs between the DiT and the VAE (and tiny test models)."""

    model: torch.nn.Module
    """What is trained; with parallel.sp_size > 1 the Trainer swaps in a sequence-parallel DiT with its weights."""

    def batches(self, *, dp_rank: int, dp_size: int) -> Iterator[Any]:
        """An endless stream of this data-parallel rank's micro-batches, continuing from `load_state_dict`."""

    def state_dict(self) -> dict:
        """JSON-serialisable data position (sampler epoch and step)."""

    def load_state_dict(self, state: dict) -> None: ...

    def loss(self, model: torch.nn.Module, batch: Any, *, generator: torch.Generator, step: int) -> tuple[torch.Tensor, dict]:
        """Scalar loss on this micro-batch and float logs; `model` is the DeepSpeed engine (call it)."""

    def tokens(self, batch: Any) -> int:
        """Work in a batch, for throughput (latent tokens for the DiT, pixels for the VAE)."""

    def media(self, step: int, *, weights: dict[str, torch.Tensor], out_dir: Path, writer: Any) -> None:
        """Rank 0, every `log.media_every` steps: samples or reconstructions from `weights`."""

    def finish(self, run_dir: Path, *, weights: dict[str, torch.Tensor]) -> None:
        """Rank 0, after the last step, with the weights that get exported (e.g. the VAE's latent statistics)."""


def lr_at(step: int, *, optim: OptimConfig, total_steps: int) -> float:
    """Linear warm-up to `lr`, then cosine decay to lr * min_lr_ratio at `total_steps`. `step` is 0-based."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    progress = (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps)
    floor = optim.lr * optim.min_lr_ratio
    return floor + (optim.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def lr_scale_for(lr_scales: dict[str, float], name: str) -> tuple[str | None, float]:
    """The first pattern of `optim.lr_scales` that `re.search` finds in the parameter name, and its scale
    (None and 1.0 when none does)."""
    pattern = next((pattern for pattern in lr_scales if re.search(pattern, name)), None)
    return pattern, lr_scales[pattern] if pattern is not None else 1.0


def param_groups(model: torch.nn.Module, lr_scales: dict[str, float]) -> list[dict[str, Any]]:
    """Optimizer parameter groups, one per learning-rate scale (key "lr_scale"), in the model's order.

    A scale of 0 freezes: those parameters stop requiring gradients and join no group, so backward skips
    them (a frozen VAE encoder costs no backward pass at all) and the optimizer holds no state for them.
    """
    groups: dict[float, list[torch.nn.Parameter]] = {}
    frozen: list[torch.nn.Parameter] = []
    unmatched = dict.fromkeys(lr_scales)
    for name, param in model.named_parameters():
        pattern, scale = lr_scale_for(lr_scales, name)
        unmatched.pop(pattern, None)
        if scale == 0:
            frozen.append(param)
        elif param.requires_grad:
            groups.setdefault(scale, []).append(param)
    if unmatched:
        names = [name for name, _ in model.named_parameters()]
        raise ValueError(f"optim.lr_scales: {list(unmatched)} match no parameter name; names look like "
                         f"{names[:2] + names[-1:]}")
    if not groups:
        raise ValueError(f"optim.lr_scales {dict(lr_scales)} freezes every parameter: nothing would train")
    for param in frozen:  # only once the scales are known good: a refused config leaves the model as it was
        param.requires_grad_(False)
    return [{"params": params, "lr_scale": scale} for scale, params in groups.items()]


def step_generator(seed: int, *, step: int, micro: int, dp_rank: int) -> torch.Generator:
    """Noise for one micro-batch, derived from (seed, step, micro, rank): a resumed run redraws it exactly.

    A CPU generator: the peers draw on the generator's device and move the result, so a seed gives the
    same numbers on any accelerator."""
    mixed = (seed * 1_000_003 + step) * 1_000_033 + micro * 1_009 + dp_rank
    return torch.Generator().manual_seed(mixed % (2**63))


class EMA:
    """Exponential moving average of the weights, a full fp32 copy on every rank.

    Updated from the module's weights after each optimizer step (in bf16/fp16 runs those are the 16-bit
    compute weights, not the fp32 masters, which would need a gather per parameter on every step).
    Under ZeRO-3 the weights are gathered for the update, so EMA costs a full fp32 copy of the model per
    rank there: set ema.decay=0 for models that only fit sharded.
    """

    def __init__(self, module: torch.nn.Module, cfg: EMAConfig):
        self.cfg = cfg
        self.weights = _gathered_weights(module)

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        decay = self.cfg.decay if step >= self.cfg.start_step else 0.0
        with _gathered(module) as params:
            # One fused lerp over all tensors, read in place (.float() of a float32 weight is the weight itself).
            names = list(self.weights)
            torch._foreach_lerp_([self.weights[name] for name in names],
                                 [params[name].detach().float() for name in names], 1.0 - decay)


@contextlib.contextmanager
def _gathered(module: torch.nn.Module) -> Iterator[dict[str, torch.nn.Parameter]]:
    """The module's parameters by name, whole for the duration (ZeRO-3 gathers them; a no-op below)."""
    import deepspeed

    params = dict(module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        yield params


def _gathered_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A float32 copy of every parameter, by name."""
    with _gathered(module) as params:
        return {name: p.detach().float().clone() for name, p in params.items()}


class NonFiniteLossError(RuntimeError):
    """Too many NaN/inf losses in a row; a checkpoint was saved before raising."""


# ----------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------
class Trainer:
    """Owns the engine, the EMA, the logs and the checkpoints of one run; `run()` trains to `cfg.steps`."""

    def __init__(self, cfg: LoopConfig, task: Task, *, config_yaml: str = ""):
        import deepspeed

        if cfg.optim.lr_scales and cfg.parallel.zero_stage > 0:
            # The groups do train at their rates under ZeRO, but its checkpoint gathering of optimizer state
            # fails with more than one group (DeepSpeed 0.19: "exp_avg not found in optimizer state fragment").
            raise ValueError(f"optim.lr_scales needs parallel.zero_stage=0 (got {cfg.parallel.zero_stage}): "
                             "ZeRO checkpoints of several parameter groups do not save")
        self.cfg, self.task = cfg, task
        self.config_yaml = config_yaml or config_to_yaml(cfg)
        self.run_dir = Path(cfg.run_dir)
        parallel.init_distributed(timeout_s=cfg.parallel.timeout_s)
        # Ranks of one sequence-parallel group read the same batches and draw the same noise (both keyed by
        # dp_rank), and the DiT shards its tokens over the group.
        self.sp_group, self.dp_rank, self.dp_size = parallel.new_sequence_parallel_group(cfg.parallel.sp_size)
        if self.sp_group is not None:
            task.model = parallel.SequenceParallelDiT.from_model(task.model, self.sp_group)
        user = json.loads(Path(cfg.parallel.deepspeed_config).read_text()) if cfg.parallel.deepspeed_config else None
        # Below ZeRO (always float32 there) the loop clips the gradients itself: the same rule as DeepSpeed's
        # (scale by max_norm / (norm + 1e-6) when below 1) in one fused norm instead of one per tensor, and the
        # norm it returns is the one the log reports.
        self._clips_itself = cfg.parallel.zero_stage == 0
        ds_config = parallel.build_deepspeed_config(
            micro_batch_size=cfg.parallel.micro_batch_size, grad_accum_steps=cfg.parallel.grad_accum_steps,
            data_parallel_size=parallel.world_size(), zero_stage=cfg.parallel.zero_stage,
            precision=cfg.parallel.precision, grad_clip=0.0 if self._clips_itself else cfg.optim.grad_clip,
            user_config=user)
        # A torch AdamW, not DeepSpeed's: its fused optimizer is compiled on first use and fails on CPU. Torch's
        # own fused kernel (CPU and CUDA) updates each tensor in one pass; without `fused` torch takes a Python
        # loop of eight small ops per tensor on CPU, which cost the demo DiT a tenth of its step.
        optimizer = torch.optim.AdamW(param_groups(task.model, cfg.optim.lr_scales), lr=cfg.optim.lr,
                                      betas=tuple(cfg.optim.betas),
                                      eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay, fused=True)
        self.engine, _, _, _ = deepspeed.initialize(model=task.model, optimizer=optimizer, config=ds_config)
        if cfg.compile:
            self.engine.module.compile()
        if parallel.world_size() == 1 and cfg.parallel.zero_stage == 0:
            # One rank has nothing to reduce, but DeepSpeed would still flatten every gradient into buckets,
            # all-reduce them over the one rank and copy them back, on every step.
            self.engine.enable_backward_allreduce = False
        self.device = self.engine.device
        self.ema = EMA(self.engine.module, cfg.ema) if cfg.ema.decay > 0 else None
        self.step = 0
        self.counters = {"skipped_nonfinite": 0, "consecutive_nonfinite": 0}
        self._stop_signal: int | None = None
        self._writer = self._jsonl = self._bar = None

    # -- checkpoints ---------------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def save(self) -> Path:
        state = {"counters": self.counters, "data": self.task.state_dict()}
        return ckpt.save_checkpoint(self.checkpoint_dir, step=self.step, engine=self.engine, trainer_state=state,
                                    config_yaml=self.config_yaml, ema=self.ema.weights if self.ema else None,
                                    keep=self.cfg.checkpoint.keep)

    def resume(self, which: str) -> None:
        folder = ckpt.resolve_checkpoint(self.checkpoint_dir, which)
        state, ema, rng = ckpt.load_checkpoint(folder, engine=self.engine)
        self.step, self.counters = state["step"], state["counters"]
        self.task.load_state_dict(state["data"])
        ckpt.set_rng_state(rng)
        if self.ema is not None:
            if ema is None:
                raise ValueError(f"{folder} has no ema.safetensors but ema.decay={self.cfg.ema.decay} > 0")
            self.ema.weights = {name: value.to(self.device) for name, value in ema.items()}
        if parallel.is_main():
            print(f"resumed from {folder} at step {self.step}", file=sys.stderr)

    # -- one optimizer step --------------------------------------------------------------------------
    def train_step(self, batches: Iterator[Any]) -> dict[str, float]:
        """Accumulate `grad_accum_steps` finite micro-batches, then step. NaN/inf micro-batches are skipped."""
        cfg = self.cfg
        lr = lr_at(self.step, optim=cfg.optim, total_steps=cfg.steps)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        losses, logs, tokens, micro = [], {}, 0, 0
        while micro < cfg.parallel.grad_accum_steps:
            batch = next(batches)
            generator = step_generator(cfg.seed, step=self.step, micro=micro + self.counters["consecutive_nonfinite"],
                                       dp_rank=self.dp_rank)
            loss, logs = self.task.loss(self.engine, batch, generator=generator, step=self.step)
            if parallel.any_rank(not bool(torch.isfinite(loss.detach()).all())):
                self.counters["skipped_nonfinite"] += 1
                self.counters["consecutive_nonfinite"] += 1
                if self.counters["consecutive_nonfinite"] >= cfg.max_consecutive_nonfinite:
                    self.save()
                    raise NonFiniteLossError(
                        f"{self.counters['consecutive_nonfinite']} NaN/inf losses in a row at step {self.step} "
                        f"(max_consecutive_nonfinite={cfg.max_consecutive_nonfinite}); saved a checkpoint in "
                        f"{self.checkpoint_dir}. Lower optim.lr, use bf16 instead of fp16, or check the data.")
                continue
            self.counters["consecutive_nonfinite"] = 0
            with self._sequence_parallel_backward():
                self.engine.backward(loss)
            boundary = self.engine.is_gradient_accumulation_boundary()
            grad_norm = self._clip_gradients() if boundary and self._clips_itself else None
            self.engine.step()
            losses.append(loss.detach().float().item())
            tokens += self.task.tokens(batch)
            micro += 1
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.engine.module, self.step)
        grad_norm = grad_norm if grad_norm is not None else self.engine.get_global_grad_norm()
        return {"loss": parallel.mean_over_ranks(sum(losses) / len(losses)), "lr": lr,
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "tokens": tokens * parallel.world_size() / self.cfg.parallel.sp_size,
                "skipped_nonfinite": self.counters["skipped_nonfinite"], **logs}

    def _sequence_parallel_backward(self) -> contextlib.AbstractContextManager:
        # Gradient checkpointing recomputes the blocks in backward, and their attention must shard again.
        return parallel.ulysses_attention(self.sp_group) if self.sp_group is not None else contextlib.nullcontext()

    def _clip_gradients(self) -> float:
        """Clip to optim.grad_clip (0 = no clipping) and return the norm before clipping; gradients are
        already averaged over ranks after the boundary backward."""
        params = [p for p in self.engine.module.parameters() if p.grad is not None]
        if not params:
            return 0.0
        max_norm = self.cfg.optim.grad_clip or math.inf
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True))

    # -- the run -------------------------------------------------------------------------------------
    def run(self, *, until: int | None = None) -> list[dict[str, float]]:
        """Train from `self.step` to `until` (default `cfg.steps`, which also sets the LR schedule's length),
        save, and return the per-step logs (rank 0 also writes them to disk)."""
        cfg = self.cfg
        until = cfg.steps if until is None else min(until, cfg.steps)
        self._install_signal_handlers()
        self._open_logs()
        batches = self.task.batches(dp_rank=self.dp_rank, dp_size=self.dp_size)
        history, started = [], time.perf_counter()
        try:
            while self.step < until:
                tick = time.perf_counter()
                logs = self.train_step(batches)
                logs["tokens_per_s"] = logs.pop("tokens") / max(time.perf_counter() - tick, 1e-9)
                history.append({"step": self.step, **logs})
                self._log(logs)
                if cfg.log.media_every and self.step % cfg.log.media_every == 0:
                    weights = self.export_weights()
                    if parallel.is_main():
                        self.task.media(self.step, weights=weights, out_dir=self.run_dir / "media", writer=self._writer)
                if parallel.any_rank(self._stop_signal is not None):
                    self.save()
                    raise SystemExit(128 + (self._stop_signal or signal.SIGTERM))
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < until:
                    self.save()
            self.save()
            weights = self.export_weights() if self.step == cfg.steps else None
            if parallel.is_main() and weights is not None:
                self.task.finish(self.run_dir, weights=weights)
                print(f"trained {self.step} steps in {time.perf_counter() - started:.1f}s; "
                      f"skipped {self.counters['skipped_nonfinite']} non-finite micro-batches", file=sys.stderr)
        finally:
            self._close_logs()
        return history

    def export_weights(self) -> dict[str, torch.Tensor]:
        """The weights that samples and the export use: the EMA, else the raw weights. Collective under ZeRO-3."""
        return self.ema.weights if self.ema is not None else _gathered_weights(self.engine.module)

    def _install_signal_handlers(self) -> None:
        def request_stop(signum, _frame):  # noqa: ANN001 (signal handler signature)
            self._stop_signal = signum  # acted on at the next step boundary, on every rank together

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, request_stop)

    # -- logs ----------------------------------------------------------------------------------------
    def _open_logs(self) -> None:
        if not parallel.is_main():
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "log.jsonl", "a")
        if self.cfg.log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tb"))
        if self.cfg.log.progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=self.cfg.steps, initial=self.step, dynamic_ncols=True)

    def _log(self, logs: dict[str, float]) -> None:
        if not parallel.is_main():
            return
        if self._bar is not None:  # tqdm's own rate and remaining time make the ETA
            self._bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}",
                                  tok_s=f"{logs['tokens_per_s']:.0f}", refresh=False)
            self._bar.update(1)
        if self.step % self.cfg.log.every and self.step != self.cfg.steps:
            return
        self._jsonl.write(json.dumps({"step": self.step, "time": time.time(), **logs}) + "\n")
        self._jsonl.flush()
        if self._writer is not None:
            for key, value in logs.items():
                self._writer.add_scalar(f"train/{key}", value, self.step)

    def _close_logs(self) -> None:
        for handle in (self._bar, self._jsonl, self._writer):
            if handle is not None:
                handle.close()


# ----------------------------------------------------------------------------------------------------
# The full config
# ----------------------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    manifest: str | None = None
    """Pixel data: a .csv/.jsonl manifest (`python -m data.synthetic` writes one). VAE, or DiT without cache."""
    latent_cache: str | None = None
    """DiT: a `python -m data.cache` folder of latents + text embeddings, used instead of `manifest`; its
    bucket grid is the one it was built with (cache.json), `buckets` then only sizes samples and export."""
    buckets: BucketConfig = field(default_factory=BucketConfig)
    """Resolutions, aspect ratios, frame counts and the per-batch token budget (data/buckets.py)."""
    cache_token_budget: int | None = None
    """DiT with `latent_cache`: latent tokens per batch instead of the budget the cache was built with (so
    batch sizes can change without re-encoding); None keeps the cache's."""
    num_workers: int = 0
    """DataLoader worker processes per rank."""
    decoded_cache_mb: float = 0
    """Pixel data: keep decoded files in memory up to this many MiB per process (0 = decode every read).
    Pays when files are read many times: small sets over many epochs, or stills taken from clips."""
    caption_dropout: float = 0.1
    """DiT: probability of replacing a caption by the empty prompt (trains classifier-free guidance)."""

    def __post_init__(self) -> None:
        if self.cache_token_budget is not None and self.cache_token_budget < 1:
            raise ValueError(f"cache_token_budget={self.cache_token_budget}: must be >= 1 or None")
        if self.num_workers < 0:
            raise ValueError(f"num_workers={self.num_workers}: must be >= 0")
        if self.decoded_cache_mb < 0:
            raise ValueError(f"decoded_cache_mb={self.decoded_cache_mb}: must be >= 0 (0 = decode every read)")
        if not 0 <= self.caption_dropout <= 1:
            raise ValueError(f"caption_dropout={self.caption_dropout}: must be in [0, 1]")


@dataclass
class SampleDefaultsConfig:
    """DiT: generation defaults the export writes to pipeline.json, for requests that leave them unset
    (size and frame count come from the largest bucket)."""

    steps: int = 30
    """Sampler steps."""
    guidance_scale: float = 5.0
    """Classifier-free guidance scale; a lightly trained model usually wants less than a long run."""
    temporal_guidance: float = 0.0
    """Temporal guidance scale (dit/sampling.py); 0 = off."""
    temporal_guidance_start: float = 0.0
    """Temporal guidance from step round(this * steps) on, in [0, 1]; 0 = every step."""
    cfg_zero_star: bool = False
    """CFG-Zero*: the unconditional prediction scaled by s* before guidance (dit/sampling.py)."""
    zero_init_steps: int = 0
    """Flow models: the noise left as it is for this many first steps (CFG-Zero*'s zero-init); 0 = none."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"sample_defaults.steps={self.steps}: must be >= 1")
        if self.guidance_scale < 0:
            raise ValueError(f"sample_defaults.guidance_scale={self.guidance_scale}: must be >= 0 (1 = no guidance)")
        if self.temporal_guidance < 0:
            raise ValueError(f"sample_defaults.temporal_guidance={self.temporal_guidance}: must be >= 0 (0 = off)")
        if not 0 <= self.temporal_guidance_start <= 1:
            raise ValueError(f"sample_defaults.temporal_guidance_start={self.temporal_guidance_start}: "
                             "must be in [0, 1] (a share of the steps)")
        if not 0 <= self.zero_init_steps < self.steps:
            raise ValueError(f"sample_defaults.zero_init_steps={self.zero_init_steps}: must be in [0, steps) "
                             f"(steps={self.steps}; 0 = none)")


@dataclass
class TrainConfig(LoopConfig):
    """A whole run: the loop settings (LoopConfig) plus what is trained and on which data."""

    task: str = "dit"
    """'dit' (the diffusion transformer) or 'vae' (the causal video VAE)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data."""
    dit: DiTConfig = field(default_factory=lambda: DiTConfig.from_preset("debug"))
    """DiT architecture (task 'dit')."""
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    """Flow matching or DDPM (task 'dit'); exported to pipeline.json."""
    cond: MaskSamplerConfig = field(default_factory=MaskSamplerConfig)
    """Condition-mask ratios: i2v, extension, loop, keyframes, inpaint (task 'dit')."""
    text_encoder: str = "default"
    """Text encoder: 'default' (embedded), a folder or a hub id (task 'dit')."""
    vae_path: str | None = None
    """Task 'dit': folder of the trained VAE: encodes pixels when there is no cache, decodes samples, is exported."""
    vae: VAEConfig = field(default_factory=lambda: VAEConfig.from_preset("debug"))
    """VAE architecture (task 'vae')."""
    vae_loss: VAELossConfig = field(default_factory=VAELossConfig)
    """Reconstruction, KL and discriminator weights (task 'vae')."""
    vae_stats_clips: int = 64
    """Task 'vae': clips used for the latent statistics computed at the end (stored with the export)."""
    sample_defaults: SampleDefaultsConfig = field(default_factory=SampleDefaultsConfig)
    """Task 'dit': sampler steps and guidance scale that the exported pipeline.json makes the default."""
    init_from: str | None = None
    """A saved model folder (a DiT or VAE folder, or an export holding dit/ or vae/) whose weights start this
    run: fine-tuning. Step, optimizer and data order start fresh; a --resume checkpoint replaces them all."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r}: must be one of {TASKS}")
        if self.task == "dit":
            if not self.vae_path:
                raise ValueError("vae_path=None: task 'dit' needs the trained VAE folder (train one with task=vae)")
            if not (self.data.latent_cache or self.data.manifest):
                raise ValueError("data.latent_cache and data.manifest are both unset: task 'dit' needs one")
            if tuple(self.cond.patch_size) != tuple(self.dit.patch_size):
                raise ValueError(f"cond.patch_size={self.cond.patch_size}: must equal dit.patch_size="
                                 f"{self.dit.patch_size} (condition boxes align to tokens)")
            parallel.check_heads_divisible(self.dit.num_heads, self.parallel.sp_size)
            if self.sample_defaults.zero_init_steps and self.diffusion.process != "flow":
                raise ValueError(f"sample_defaults.zero_init_steps={self.sample_defaults.zero_init_steps}: a "
                                 f"zero-velocity step needs diffusion.process='flow', not "
                                 f"{self.diffusion.process!r}; use 0")
        if self.task == "vae" and not self.data.manifest:
            raise ValueError("data.manifest=None: task 'vae' trains on pixels and needs a manifest")
        if self.task == "vae" and self.parallel.sp_size > 1:
            raise ValueError(f"parallel.sp_size={self.parallel.sp_size}: sequence parallelism shards the DiT's "
                             "tokens; task 'vae' needs sp_size=1")


# ----------------------------------------------------------------------------------------------------
# Export: checkpoint -> the model folder generate.py loads
# ----------------------------------------------------------------------------------------------------
def export(run_dir: str | Path, out_dir: str | Path, *, which: str = ckpt.LATEST) -> Path:
    """Write the EMA weights (raw weights when EMA was off) of a run's checkpoint as a model folder.

    DiT runs: OUT/dit/, OUT/vae/ (copied from `vae_path`), OUT/text_encoder/ when the encoder is a local
    folder, and OUT/pipeline.json (diffusion config, encoder name, generation defaults). VAE runs: OUT/vae/
    with the latent statistics measured at the end of training (before then: init_from's when the run froze
    the encoder, else none, with a warning). Written beside OUT, then renamed.
    """
    import shutil

    from safetensors.torch import load_file

    folder = ckpt.resolve_checkpoint(Path(run_dir) / "checkpoints", which)
    cfg = load_config(TrainConfig, folder / "config.yaml")
    weights = load_file(folder / ("ema.safetensors" if (folder / "ema.safetensors").is_file() else "model.safetensors"))
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    if cfg.task == "dit":
        from dit.training import export_dit

        export_dit(cfg, weights, tmp)
    else:
        from vae.training import export_vae

        stats_file = Path(run_dir) / "latent_stats.json"
        if not export_vae(cfg, weights, tmp, stats_file=stats_file):
            # A DiT trained on latents without them sees each channel at its raw scale and offset.
            print(f"warning: {out_dir}/vae has no latent statistics: {stats_file} is written when the run "
                  f"finishes; measure them with `python -m vae.stats --vae {out_dir}/vae --manifest "
                  f"{cfg.data.manifest}` before caching latents for a DiT", file=sys.stderr)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


# ----------------------------------------------------------------------------------------------------
# Entry
# ----------------------------------------------------------------------------------------------------
def build_task(cfg: TrainConfig) -> Task:
    device = torch.device("cuda", parallel.local_rank()) if torch.cuda.is_available() else torch.device("cpu")
    if cfg.task == "dit":
        from dit.training import DiTTask

        task = DiTTask(cfg, device=device)
    else:
        from vae.training import VAETask

        task = VAETask(cfg, device=device)
    if cfg.init_from:
        ckpt.load_model_folder(task.model if cfg.task == "dit" else task.model.vae, cfg.init_from, part=cfg.task)
    return task


def main(cfg: TrainConfig, *, resume: str | None = None) -> list[dict[str, float]]:
    """Train per `cfg` (resuming from a checkpoint when asked) and export at the end."""
    parallel.init_distributed(timeout_s=cfg.parallel.timeout_s)
    trainer = Trainer(cfg, build_task(cfg))
    if resume:
        trainer.resume(resume)
    history = trainer.run()
    if cfg.checkpoint.export_at_end and parallel.is_main():
        print(f"exported to {export(cfg.run_dir, Path(cfg.run_dir) / 'export')}", file=sys.stderr)
    parallel.barrier()
    return history


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train the Spacetime VAE or DiT (one process or DeepSpeed).")
    parser.add_argument("--config", action="append",
                        help="YAML config (configs/train/*.yaml, configs/demo/*.yaml); repeat it to layer files, "
                             "each over the ones before (e.g. a fine-tuning stage over its base run's config)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. steps=100 parallel.zero_stage=2")
    parser.add_argument("--resume", help="'latest' or a checkpoint folder: continue that run")
    parser.add_argument("--export", metavar="RUN_DIR", help="write RUN_DIR's latest EMA weights as a model folder")
    parser.add_argument("--out", help="model folder written by --export")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    args = parser.parse_intermixed_args(argv)  # options may sit between overrides
    if args.export:
        if not args.out:
            parser.error("--export needs --out MODEL_DIR")
        print(export(args.export, args.out))
        return 0
    if not args.config:
        parser.error("--config is required to train")
    try:
        cfg = load_config(TrainConfig, args.config, args.overrides)
    except ConfigError as err:
        parser.exit(2, f"error: {err}\n")
    try:
        main(cfg, resume=args.resume)
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        parallel.destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
