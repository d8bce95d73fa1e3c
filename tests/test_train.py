"""The training loop on a tiny regression model: ZeRO parity, exact resume, NaN skipping, atomic saves.

Multi-process tests start one subprocess per rank with the variables a launcher would set (gloo on CPU)
and a hard timeout, so they fail rather than hang. Each worker runs `run_worker` below.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from torch import nn

from config import load_config
from dit.parallel import free_port

if TYPE_CHECKING:
    from train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 4


class Regression:
    """A two-layer MLP fit to sin(sum(x)); batch k of the global stream depends only on k, so any rank
    split of the same global batch sees the same data. `noisy` adds input noise from the per-step generator
    (rank-dependent, so only for single-layout comparisons); `nan_at` makes those micro-batches NaN."""

    def __init__(self, *, seed: int = 0, noisy: bool = False, nan_at: tuple[int, ...] = ()):
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
        self.position, self.noisy, self.nan_at = 0, noisy, set(nan_at)

    def batches(self, *, dp_rank: int, dp_size: int):
        while True:
            g = torch.Generator().manual_seed(1000 + self.position)
            x = torch.randn(GLOBAL_BATCH, 8, generator=g)
            y = x.sum(1, keepdim=True).sin()
            poisoned = self.position in self.nan_at
            self.position += 1
            per = GLOBAL_BATCH // dp_size
            yield x[dp_rank * per : (dp_rank + 1) * per], y[dp_rank * per : (dp_rank + 1) * per], poisoned

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]

    def loss(self, model, batch, *, generator, step):
        x, y, poisoned = batch
        if self.noisy:  # the loss then depends on the per-step random stream, which resume must redraw
            x = x + 0.01 * torch.randn(x.shape, generator=generator)
        dtype = next(model.parameters()).dtype  # bf16 engines hold bf16 weights
        loss = ((model(x.to(dtype)).float() - y) ** 2).mean()
        return (loss * float("nan") if poisoned else loss), {}

    def tokens(self, batch) -> int:
        return batch[0].shape[0]

    def media(self, step, *, weights, out_dir, writer) -> None:
        pass

    def finish(self, run_dir, *, weights) -> None:
        pass


def loop_config(run_dir: Path, **overrides):
    from train import LoopConfig

    cfg = LoopConfig(run_dir=str(run_dir), steps=8, seed=3)
    cfg.optim.lr, cfg.optim.warmup_steps = 3e-2, 2
    cfg.log.progress_bar = cfg.log.tensorboard = False
    cfg.log.every = 1
    cfg.ema.decay = 0.5
    cfg.checkpoint.every = 0
    for key, value in overrides.items():
        section, _, name = key.rpartition(".")
        setattr(getattr(cfg, section) if section else cfg, name, value)
    return cfg


def run_worker(spec_json: str) -> None:
    """One rank: run each job of the spec in turn (same processes, so DeepSpeed starts once), write the
    losses and final EMA weights of every job as JSON for the test to compare."""
    from train import Trainer

    spec, results = json.loads(spec_json), []
    for job in spec["jobs"]:
        cfg = loop_config(Path(job["run_dir"]), **job.get("overrides", {}), **spec.get("overrides", {}))
        task = Regression(noisy=job.get("noisy", False))
        trainer = Trainer(cfg, task)
        if job.get("resume"):
            trainer.resume("latest")
        if os.environ.get("RANK") == str(spec.get("crash_rank")):
            task.nan_at = ()  # crash on the way: an exception mid-run, as a failing rank would
            task.loss = lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError("injected crash"))
        history = trainer.run(until=job.get("until"))
        results.append({"losses": [h["loss"] for h in history],
                        "ema": {k: v.tolist() for k, v in trainer.ema.weights.items()}})
    if int(os.environ.get("RANK", "0")) == 0:
        Path(spec["out"]).write_text(json.dumps(results))


def start(spec: dict, *, ranks: int) -> list[subprocess.Popen]:
    """`run_worker(spec)` on `ranks` processes with the variables a launcher sets (gloo on CPU)."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(ranks),
           "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    code = f"from test_train import run_worker; run_worker({json.dumps(json.dumps(spec))})"
    return [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(ranks)]


def finish(procs: list[subprocess.Popen], *, timeout: float) -> list[tuple[int, str]]:
    """(return code, output) per rank; every process is killed on the way out, so nothing outlives a test."""
    outputs = []
    try:
        for proc in procs:
            outputs.append((proc.communicate(timeout=timeout)[0].decode(errors="replace"), proc.returncode))
    finally:
        for proc in procs:
            proc.kill()
    return [(code, text) for text, code in outputs]


def launch(spec: dict, *, ranks: int, timeout: float = 420) -> list[dict]:
    for code, text in finish(start(spec, ranks=ranks), timeout=timeout):
        assert code == 0, text[-3000:]
    return json.loads(Path(spec["out"]).read_text())


def trajectory_jobs(tmp: Path) -> list[dict]:
    """8 plain steps (for parity), then 8 noisy steps whole and as 4 + resume + 4 (for resume)."""
    return [{"run_dir": str(tmp / "plain")},
            {"run_dir": str(tmp / "whole"), "noisy": True},
            {"run_dir": str(tmp / "split"), "noisy": True, "until": 4},
            {"run_dir": str(tmp / "split"), "noisy": True, "resume": True}]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The jobs on one process with ZeRO-0: the trajectories everything else must reproduce."""
    tmp = tmp_path_factory.mktemp("single")
    return launch({"jobs": trajectory_jobs(tmp), "out": str(tmp / "out.json")}, ranks=1)


def assert_same_run(result: dict, expected: dict, *, rel: float) -> None:
    assert result["losses"] == pytest.approx(expected["losses"], rel=rel, abs=1e-8)
    for name, value in expected["ema"].items():
        torch.testing.assert_close(torch.tensor(result["ema"][name]), torch.tensor(value), rtol=rel, atol=1e-7)


def test_resume_continues_the_same_trajectory_single_process(single):
    plain, whole, first, second = single
    assert len(first["losses"]) == 4 and len(second["losses"]) == 4
    # Noisy inputs: the resumed half must also redraw the same per-step random numbers.
    assert_same_run({"losses": first["losses"] + second["losses"], "ema": second["ema"]}, whole, rel=1e-6)


def test_zero2_on_two_ranks_matches_one_process_and_resumes(tmp_path, single):
    plain, whole, first, second = launch({"jobs": trajectory_jobs(tmp_path), "out": str(tmp_path / "out.json"),
                                          "overrides": {"parallel.zero_stage": 2}}, ranks=2)
    assert_same_run(plain, single[0], rel=1e-5)  # same global batch, split over two ranks
    assert_same_run({"losses": first["losses"] + second["losses"], "ema": second["ema"]}, whole, rel=1e-6)


def test_zero3_on_two_ranks_matches_one_process_and_resumes(tmp_path, single):
    plain, whole, first, second = launch({"jobs": trajectory_jobs(tmp_path), "out": str(tmp_path / "out.json"),
                                          "overrides": {"parallel.zero_stage": 3}}, ranks=2)
    assert_same_run(plain, single[0], rel=1e-5)
    assert_same_run({"losses": first["losses"] + second["losses"], "ema": second["ema"]}, whole, rel=1e-6)


@pytest.mark.parametrize("zero_stage", [1, 3])
def test_bf16_checkpoint_round_trips_master_weights_and_moments_exactly(tmp_path, zero_stage):
    """The fp32 masters and Adam moments live in DeepSpeed's shards under bf16; a resume must restore them
    bit for bit (the bf16 module weights alone would lose them)."""
    from checkpoint import gather_state
    from train import Trainer

    overrides = {"parallel.precision": "bf16", "parallel.zero_stage": zero_stage, "steps": 3}
    trainer = Trainer(loop_config(tmp_path, **overrides), Regression())
    trainer.run()
    saved = gather_state(trainer.engine)
    resumed = Trainer(loop_config(tmp_path, **overrides), Regression())
    resumed.resume("latest")
    restored = gather_state(resumed.engine)
    assert restored[2] == saved[2] == 3  # optimizer steps
    for before, after in zip(saved[:2], restored[:2], strict=True):
        assert before.keys() == after.keys()
        for name in before:
            assert torch.equal(before[name], after[name]), name


def test_a_crashed_rank_makes_every_rank_exit_nonzero_in_bounded_time(tmp_path):
    spec = {"jobs": [{"run_dir": str(tmp_path / "run")}], "out": str(tmp_path / "out.json"), "crash_rank": 1,
            "overrides": {"parallel.timeout_s": 20.0}}
    started = time.monotonic()
    results = finish(start(spec, ranks=2), timeout=120)
    assert all(code != 0 for code, _ in results), [text[-1000:] for _, text in results]
    assert time.monotonic() - started < 100


class Skipping(Regression):
    """The Regression stream with some positions left out: what a run that skips them must equal."""

    def __init__(self, *, leave_out: tuple[int, ...]):
        super().__init__()
        self.leave_out = set(leave_out)

    def batches(self, *, dp_rank: int, dp_size: int):
        for batch in super().batches(dp_rank=dp_rank, dp_size=dp_size):
            if self.position - 1 not in self.leave_out:
                yield batch


def test_lr_scales_multiply_each_matching_parameters_first_adam_step(tmp_path):
    """Adam's first step moves every weight by the learning rate times the sign of its gradient (no weight
    decay, eps far below every gradient), so the step shows each group's learning rate directly."""
    from train import Trainer

    cfg = loop_config(tmp_path, **{"optim.lr_scales": {r"^2\.": 10.0, r"^0\.bias": 0.0}, "ema.decay": 0.0,
                                    "optim.eps": 1e-16})
    trainer = Trainer(cfg, Regression())
    before = {name: p.detach().clone() for name, p in trainer.engine.module.named_parameters()}
    lr = trainer.run(until=1)[0]["lr"]
    assert lr > 0
    for name, param in trainer.engine.module.named_parameters():
        scale = 10.0 if name.startswith("2.") else 0.0 if name == "0.bias" else 1.0
        step = (param.detach() - before[name]).abs()
        torch.testing.assert_close(step, torch.full_like(step, lr * scale), rtol=1e-3, atol=1e-9)
    # A 0 scale freezes outright: no gradient is computed for it and the optimizer holds nothing of it.
    frozen = trainer.engine.module.get_parameter("0.bias")
    assert not frozen.requires_grad and frozen.grad is None
    held = {id(p) for group in trainer.engine.optimizer.param_groups for p in group["params"]}
    assert id(frozen) not in held and id(trainer.engine.module.get_parameter("0.weight")) in held


@pytest.mark.parametrize(("stage", "resampler_scale"), [("decoder", 60.0), ("sharpen", 30.0), ("sharpen-2", 30.0)])
def test_demo_vae_stages_3_to_5_freeze_the_encoder_and_speed_only_the_decoders_time_resamplers(
    stage, resampler_scale
):
    """The regexes of configs/demo/recipe-vae-{decoder,sharpen,sharpen-2}.yaml against the real parameter names:
    a typo there would train the encoder (and change the latents the shipped DiT was trained on) or miss the
    resamplers."""
    from train import param_groups
    from vae.training import VAEWithLoss

    cfg = demo_stage(f"recipe-vae-{stage}.yaml")
    model = VAEWithLoss(cfg.vae, cfg.vae_loss)
    scale = {id(p): group["lr_scale"] for group in param_groups(model, cfg.optim.lr_scales) for p in group["params"]}
    resamplers = 0
    for name, param in model.named_parameters():
        if name.startswith(("vae.encoder.", "vae.conv1.")):
            assert not param.requires_grad and id(param) not in scale, name
        elif name.startswith("vae.decoder.") and "time_conv" in name:
            resamplers += 1
            assert scale[id(param)] == resampler_scale, name
        else:
            assert scale[id(param)] == 1.0, name
    assert resamplers >= 2  # weight and bias of at least one time resampler


def test_lr_scales_that_match_nothing_are_negative_or_meet_zero_are_refused(tmp_path):
    from config import ConfigError
    from train import TrainConfig, Trainer

    with pytest.raises(ValueError, match=r"\['time_conv'\] match no parameter name; names look like \['0.weight'"):
        Trainer(loop_config(tmp_path, **{"optim.lr_scales": {"time_conv": 10.0}}), Regression())
    task = Regression()
    with pytest.raises(ValueError, match="freezes every parameter"):
        Trainer(loop_config(tmp_path, **{"optim.lr_scales": {".": 0.0}}), task)
    assert all(p.requires_grad for p in task.model.parameters())  # refused before anything was frozen
    with pytest.raises(ValueError, match=r"optim.lr_scales needs parallel.zero_stage=0 \(got 2\)"):
        Trainer(loop_config(tmp_path, **{"optim.lr_scales": {"0": 2.0}, "parallel.zero_stage": 2}), Regression())
    with pytest.raises(ConfigError, match=r"optim: lr_scales\['x'\]=-1.0: must be >= 0"):
        load_config(TrainConfig, ROOT / "configs/demo/recipe-vae-clips.yaml", overrides=["optim.lr_scales.x=-1"])
    cfg = load_config(TrainConfig, ROOT / "configs/demo/recipe-vae-clips.yaml", overrides=["optim.lr_scales.t=10"])
    assert cfg.optim.lr_scales["t"] == 10.0


def test_decoded_cache_setting_is_read_and_checked():
    from config import ConfigError
    from train import TrainConfig

    cfg = load_config(TrainConfig, ROOT / "configs/demo/recipe-vae.yaml")
    assert cfg.data.decoded_cache_mb == 512  # the stills stage reads each file about 8 times
    with pytest.raises(ConfigError, match=r"decoded_cache_mb=-1.0: must be >= 0"):
        load_config(TrainConfig, ROOT / "configs/demo/recipe-vae.yaml", overrides=["data.decoded_cache_mb=-1"])


@pytest.mark.parametrize(("override", "message"), [
    ("sample_defaults.temporal_guidance=-1", r"sample_defaults.temporal_guidance=-1.0: must be >= 0"),
    ("sample_defaults.temporal_guidance_start=1.5", r"sample_defaults.temporal_guidance_start=1.5: must be in \[0, 1\]"),
    ("sample_defaults.zero_init_steps=50", r"sample_defaults.zero_init_steps=50: must be in \[0, steps\) \(steps=50"),
    ("sample_defaults.zero_init_steps=1 diffusion.process=ddpm", "zero-velocity step needs diffusion.process='flow'"),
])
def test_bad_sample_defaults_are_refused_before_a_run_starts(override, message):
    from config import ConfigError
    from train import TrainConfig

    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, ROOT / "configs/demo/recipe-dit.yaml", overrides=override.split())


def test_nonfinite_losses_are_skipped_counted_and_leave_the_weights_untouched(tmp_path):
    from train import Trainer

    poisoned = Trainer(loop_config(tmp_path / "a"), Regression(nan_at=(2, 3, 6)))
    history = poisoned.run()
    clean = Trainer(loop_config(tmp_path / "b"), Skipping(leave_out=(2, 3, 6)))
    expected = clean.run()
    assert poisoned.counters["skipped_nonfinite"] == 3 and history[-1]["skipped_nonfinite"] == 3
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in expected], rel=1e-6)
    for name, value in clean.ema.weights.items():
        torch.testing.assert_close(poisoned.ema.weights[name], value)


def test_too_many_nonfinite_losses_in_a_row_save_and_stop(tmp_path):
    from checkpoint import resolve_checkpoint
    from train import NonFiniteLossError, Trainer

    trainer = Trainer(loop_config(tmp_path, max_consecutive_nonfinite=3), Regression(nan_at=tuple(range(2, 100))))
    with pytest.raises(NonFiniteLossError, match="3 NaN/inf losses in a row at step 2"):
        trainer.run()
    assert json.loads((resolve_checkpoint(tmp_path / "checkpoints", "latest") / "state.json").read_text())["step"] == 2


def test_sigkill_while_saving_leaves_a_loadable_latest(tmp_path):
    """Kill a run at the moment a checkpoint folder is half written; `latest` must still load and resume."""
    from checkpoint import resolve_checkpoint
    from train import Trainer

    spec = {"jobs": [{"run_dir": str(tmp_path)}], "out": str(tmp_path / "out.json"),
            "overrides": {"steps": 100000, "checkpoint.every": 1, "checkpoint.keep": 2}}
    (proc,) = start(spec, ranks=1)
    checkpoints, deadline = tmp_path / "checkpoints", time.monotonic() + 90
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if (checkpoints / "latest").exists() and any(checkpoints.glob(".tmp-*")):
                os.kill(proc.pid, signal.SIGKILL)  # mid-save: a temporary folder exists right now
                break
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-save"
    folder = resolve_checkpoint(checkpoints, "latest")
    step = json.loads((folder / "state.json").read_text())["step"]
    trainer = Trainer(loop_config(tmp_path, steps=step + 2), Regression())
    trainer.resume("latest")  # loads model, optimizer, EMA and RNG without error
    assert trainer.step == step and len(trainer.run()) == 2


def test_sigterm_saves_then_exits(tmp_path):
    spec = {"jobs": [{"run_dir": str(tmp_path)}], "out": str(tmp_path / "out.json"), "overrides": {"steps": 100000}}
    (proc,) = start(spec, ranks=1)
    log, deadline = tmp_path / "log.jsonl", time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None and not (log.exists() and log.read_text().count("\n") >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    ((code, text),) = finish([proc], timeout=60)
    assert code == 128 + signal.SIGTERM, text[-2000:]
    saved = json.loads((tmp_path / "checkpoints" / (tmp_path / "checkpoints" / "latest").read_text().strip()
                        / "state.json").read_text())["step"]
    logged = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert saved == logged[-1] >= 3  # the checkpoint is the last completed step, nothing lost


# The demo DiT's stages in the order `make demo-train` layers them: each runs as
# `train.py --config STAGE_1 ... --config STAGE_N`.
DIT_STAGES = [ROOT / "configs/demo" / name for name in (
    "recipe-dit.yaml", "recipe-dit-finish.yaml", "recipe-dit-finish-2.yaml", "recipe-dit-fine.yaml",
    "recipe-dit-selfcond.yaml")]
# Config files that are layers over another (train.py --config BASE --config LAYER), by file name.
LAYER_BASES = {
    "recipe-vae-sharpen-2.yaml": [ROOT / "configs/demo/recipe-vae-sharpen.yaml"],
    **{stage.name: DIT_STAGES[:i] for i, stage in enumerate(DIT_STAGES) if i > 0},
}


def demo_stage(name: str) -> TrainConfig:
    """A configs/demo stage loaded as its command line in the Makefile loads it: over the stages it layers on."""
    from train import TrainConfig

    return load_config(TrainConfig, [*LAYER_BASES.get(name, []), ROOT / "configs/demo" / name])


@pytest.mark.parametrize("path", sorted([*(ROOT / "configs" / "train").glob("*.yaml"), *(ROOT / "configs" / "demo").glob("*.yaml")]),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_training_config_loads_and_round_trips(path, tmp_path):
    """A typo'd key or an invalid value in a shipped YAML fails here, not after a cluster job starts. A layer
    (a stage that names only how it differs) is loaded over its base, as its command line does."""
    from config import save_config
    from train import TrainConfig

    cfg = load_config(TrainConfig, [*LAYER_BASES.get(path.name, []), path])
    assert load_config(TrainConfig, save_config(cfg, tmp_path / "c.yaml")) == cfg


def test_cli_takes_options_between_overrides(capsys):
    """`--resume latest` may sit between overrides: the override after it still reaches the config loader."""
    from train import cli

    with pytest.raises(SystemExit) as exit_info:
        cli(["--config", str(ROOT / "configs/train/dit_debug.yaml"), "steps=1", "--resume", "latest", "bogus.key=3"])
    assert exit_info.value.code == 2
    assert "unknown config key 'bogus'" in capsys.readouterr().err


def _assert_same_but(stage, stage_1, *, named: set[str]) -> None:
    """Every TrainConfig field outside `named` is stage 1's, and of the optimizer only the rate differs."""
    import dataclasses

    from train import TrainConfig

    for f in dataclasses.fields(TrainConfig):
        if f.name not in named:
            assert getattr(stage, f.name) == getattr(stage_1, f.name), f.name
    assert dataclasses.replace(stage.optim, lr=stage_1.optim.lr) == stage_1.optim


@pytest.mark.parametrize("layer", ["recipe-dit-finish.yaml", "recipe-dit-finish-2.yaml"])
def test_demo_dit_later_stages_start_from_the_previous_export_and_change_only_what_they_name(layer):
    """configs/demo/recipe-dit-finish*.yaml layered over the stages before (as `make demo-train` runs them):
    each must read the previous stage's export and write elsewhere, or `make demo-train` would fine-tune the
    wrong weights or overwrite the ones it starts from; every other setting (model, data, diffusion, masks)
    is stage 1's."""
    from train import TrainConfig

    bases = LAYER_BASES[layer]
    stage_1 = load_config(TrainConfig, bases[0])
    before = load_config(TrainConfig, bases)
    stage = demo_stage(layer)
    assert stage.init_from == f"{before.run_dir}/export" and stage.run_dir != before.run_dir
    assert stage.optim.lr < before.optim.lr and stage.seed != before.seed
    _assert_same_but(stage, stage_1, named={"run_dir", "init_from", "seed", "steps", "optim"})


def test_demo_dit_fine_stage_trains_the_resized_previous_export_at_the_new_patch_only():
    """recipe-dit-fine.yaml trains what the Makefile's `dit.resize` writes from stage 3's export: it must read
    that folder, change the DiT's and the condition masks' patch together (a mask cut at the old patch would
    not cover the new tokens), and keep every other setting of stage 1 but the run's own."""
    import dataclasses

    from train import TrainConfig

    bases = LAYER_BASES["recipe-dit-fine.yaml"]
    stage_1, before = load_config(TrainConfig, bases[0]), load_config(TrainConfig, bases)
    stage = demo_stage("recipe-dit-fine.yaml")
    makefile = (ROOT / "Makefile").read_text()
    resize = f"dit.resize $(DEMO)/{Path(before.run_dir).name}/export --patch-size 1 2 2 --out $(DEMO)/dit-1x2x2"
    assert resize in makefile and stage.init_from == "outputs/demo/dit-1x2x2"
    assert f"cp -r $(DEMO)/{Path(stage.run_dir).name}/export weights/demo" in makefile
    assert stage.run_dir not in (before.run_dir, stage.init_from) and stage.seed != before.seed
    assert stage.dit.patch_size == stage.cond.patch_size == (1, 2, 2) != stage_1.dit.patch_size
    assert dataclasses.replace(stage.dit, patch_size=stage_1.dit.patch_size) == stage_1.dit
    assert dataclasses.replace(stage.cond, patch_size=stage_1.cond.patch_size) == stage_1.cond
    _assert_same_but(stage, stage_1, named={"run_dir", "init_from", "seed", "steps", "optim", "dit", "cond"})


def test_demo_dit_selfcond_stage_trains_stage_4s_export_with_the_input_added_and_is_what_ships():
    """recipe-dit-selfcond.yaml trains what the Makefile's `dit.resize --self-cond` writes from stage 4's export:
    it must read that folder, give the DiT the input and the loss its estimates together (the run refuses one
    without the other), keep every other setting of stage 4 but the run's own, and be what the Makefile ships."""
    import dataclasses

    stage_4, stage = demo_stage("recipe-dit-fine.yaml"), demo_stage("recipe-dit-selfcond.yaml")
    makefile = (ROOT / "Makefile").read_text()
    resize = f"dit.resize $(DEMO)/{Path(stage_4.run_dir).name}/export --self-cond --out $(DEMO)/dit-sc-init"
    assert resize in makefile and stage.init_from == "outputs/demo/dit-sc-init"
    assert f"cp -r $(DEMO)/{Path(stage.run_dir).name}/export weights/demo" in makefile
    assert stage.run_dir not in (stage_4.run_dir, stage.init_from) and stage.seed != stage_4.seed
    assert stage.dit.self_cond and stage.diffusion.self_cond > 0 and not stage_4.dit.self_cond
    assert dataclasses.replace(stage.dit, self_cond=False) == stage_4.dit
    assert dataclasses.replace(stage.diffusion, self_cond=0.0) == stage_4.diffusion
    _assert_same_but(stage, stage_4, named={"run_dir", "init_from", "seed", "steps", "optim", "dit", "diffusion"})


def test_demo_vae_stage_5_continues_stage_4_and_is_the_vae_the_dit_ships_with():
    """recipe-vae-sharpen-2.yaml is stage 4 run on from its export: everything but the run's own folder, start
    and length is stage 4's. Its export is what the Makefile caches latents with and what the DiT stages name
    as vae_path (so the shipped folder gets this decoder, or stage 4's when the Makefile skips stage 5); with
    the encoder frozen since stage 3 its latents are stage 2's either way."""

    stage_4, stage_5 = demo_stage("recipe-vae-sharpen.yaml"), demo_stage("recipe-vae-sharpen-2.yaml")
    assert stage_5.init_from == f"{stage_4.run_dir}/export/vae" and stage_5.run_dir != stage_4.run_dir
    _assert_same_but(stage_5, stage_4, named={"run_dir", "init_from", "steps"})
    assert stage_5.optim == stage_4.optim
    export = f"{stage_5.run_dir}/export/vae"
    makefile = (ROOT / "Makefile").read_text()
    assert f"--vae $(DEMO)/{Path(stage_5.run_dir).name}/export/vae --out $(DEMO)/cache" in makefile
    assert "--config configs/demo/recipe-vae-sharpen.yaml --config configs/demo/recipe-vae-sharpen-2.yaml" in makefile
    # VAE_FINE_STEPS=0 puts stage 4's export where stage 5's would be, for the cache and the DiT stages to find
    skip = f"cp -r $(DEMO)/{Path(stage_4.run_dir).name}/export/vae $(DEMO)/{Path(stage_5.run_dir).name}/export/vae"
    assert skip in makefile
    for stage in DIT_STAGES:
        assert demo_stage(stage.name).vae_path == export, stage.name


def test_shipped_demo_folder_samples_as_the_recipes_last_dit_stage_exports():
    """weights/demo/pipeline.json and dit/config.json are the export of the recipe's last DiT stage, float16
    aside: a sampling default or a model setting changed in one and not the other would make `make demo-train`
    ship a model that samples unlike the one measured in docs/demo.md."""
    from dit.model import DiTConfig
    from dit.pipeline import read_pipeline_config
    from dit.training import pipeline_config

    last = demo_stage(DIT_STAGES[-1].name)
    assert read_pipeline_config(ROOT / "weights/demo") == pipeline_config(last)
    shipped = DiTConfig(**json.loads((ROOT / "weights/demo/dit/config.json").read_text()))
    assert shipped == last.dit


def test_cli_layers_repeated_configs_and_names_a_missing_later_one(tmp_path, capsys):
    from train import cli

    with pytest.raises(SystemExit) as exit_info:
        cli(["--config", str(ROOT / "configs/demo/recipe-dit.yaml"), "--config", str(tmp_path / "stage2.yaml")])
    assert exit_info.value.code == 2 and "stage2.yaml" in capsys.readouterr().err
