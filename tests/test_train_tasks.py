"""The DiT and VAE tasks end to end on a tiny synthetic world: the loss falls, the export loads.

"Falls" is measured on fixed batches with a fixed generator before and after training, so the
comparison is not at the mercy of which noise levels a training step happened to draw.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from config import load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """4 clips of 5 frames and 4 stills at 32x32, and a random debug VAE folder."""
    from data.synthetic import write_dataset
    from vae.model import CausalVAE, VAEConfig

    tmp = tmp_path_factory.mktemp("world")
    manifest = write_dataset(tmp / "synth", clips=4, images=4, heldout=0, frames=5, size=32, seed=0, fps=8.0,
                             workers=1)
    torch.manual_seed(0)
    vae = CausalVAE(VAEConfig.from_preset("debug")).save_pretrained(tmp / "vae")
    return {"manifest": Path(manifest), "vae": Path(vae), "tmp": tmp}


BUCKETS = ["data.buckets.resolutions=[32px]", "data.buckets.frame_counts=[1,5]", "data.buckets.token_budget=64",
           "data.buckets.max_batch_size=4"]
QUIET = ["log.progress_bar=false", "log.tensorboard=false", "checkpoint.every=0"]


def fixed_loss(trainer, batches: list, *, step: int = 0) -> float:
    """The task's loss on fixed batches with fixed generators (no gradient)."""
    with torch.no_grad():
        losses = [trainer.task.loss(trainer.engine, batch, generator=torch.Generator().manual_seed(i), step=step)[0]
                  for i, batch in enumerate(batches)]
    return float(torch.stack(losses).mean())


def test_dit_loss_falls_and_export_holds_the_ema_weights(world, tmp_path):
    from safetensors.torch import load_file

    from dit.model import DiT
    from dit.pipeline import read_pipeline_config
    from train import TrainConfig, Trainer, build_task, export

    cfg = load_config(TrainConfig, None, [
        "task=dit", f"run_dir={tmp_path}", f"vae_path={world['vae']}", f"data.manifest={world['manifest']}",
        # DDPM's epsilon target is learnable within a few steps at every noise level; flow matching's
        # velocity has a high irreducible floor on random-VAE latents, so a short run barely moves it.
        "steps=20", "optim.lr=1e-2", "optim.warmup_steps=3", "ema.decay=0.9", "data.caption_dropout=0.1",
        "dit.text_dim=64", "dit.in_channels=4", "dit.out_channels=4", "diffusion.process=ddpm",
        "sample_defaults.steps=12", "sample_defaults.guidance_scale=2.5", "sample_defaults.temporal_guidance=0.5",
        "sample_defaults.temporal_guidance_start=0.25", "sample_defaults.cfg_zero_star=true", *BUCKETS, *QUIET])
    trainer = Trainer(cfg, build_task(cfg))
    stream = trainer.task.batches(dp_rank=0, dp_size=1)
    probe = [next(stream) for _ in range(3)]
    before = fixed_loss(trainer, probe)
    # throughput counts every sample's tokens, 1x2x2 patches over the debug VAE's latents
    for batch in probe:
        frames, height, width = trainer.task.vae.latent_shape(*batch["video"].shape[2:])
        assert trainer.task.tokens(batch) == batch["video"].shape[0] * frames * (height // 2) * (width // 2)
    trainer.run()
    after = fixed_loss(trainer, probe)
    assert after < 0.7 * before, (before, after)

    out = export(tmp_path, tmp_path / "model")
    exported = load_file(out / "dit" / "model.safetensors")
    assert exported.keys() == trainer.ema.weights.keys()
    for name, value in trainer.ema.weights.items():
        torch.testing.assert_close(exported[name], value)
    pipeline = read_pipeline_config(out)
    assert pipeline.diffusion == cfg.diffusion
    assert (pipeline.defaults.steps, pipeline.defaults.guidance_scale, pipeline.defaults.sampler) == (12, 2.5, "ddim")
    assert (pipeline.defaults.temporal_guidance, pipeline.defaults.temporal_guidance_start) == (0.5, 0.25)
    assert (pipeline.defaults.cfg_zero_star, pipeline.defaults.zero_init_steps) == (True, 0)
    assert (out / "vae" / "model.safetensors").read_bytes() == (world["vae"] / "model.safetensors").read_bytes()
    DiT.from_pretrained(out / "dit")  # generate.py's loader accepts the folder


def test_self_conditioned_dit_trains_exports_and_samples_with_its_estimates(world, tmp_path):
    from dit.modes import GenerationRequest
    from dit.pipeline import Pipeline
    from train import TrainConfig, Trainer, build_task, export

    overrides = [
        "task=dit", f"run_dir={tmp_path}", f"vae_path={world['vae']}", f"data.manifest={world['manifest']}",
        "steps=20", "optim.lr=1e-2", "optim.warmup_steps=3", "ema.decay=0", "dit.text_dim=64", "dit.in_channels=4",
        "dit.out_channels=4", "diffusion.process=ddpm", "dit.self_cond=true", "sample_defaults.steps=3",
        *BUCKETS, *QUIET]
    with pytest.raises(ValueError, match="set both"):
        build_task(load_config(TrainConfig, None, overrides))  # the DiT has the input, the loss never feeds it
    cfg = load_config(TrainConfig, None, [*overrides, "diffusion.self_cond=0.5"])
    trainer = Trainer(cfg, build_task(cfg))
    probe = [next(trainer.task.batches(dp_rank=0, dp_size=1)) for _ in range(2)]
    before = fixed_loss(trainer, probe)
    trainer.run()
    assert fixed_loss(trainer, probe) < 0.7 * before

    pipe = Pipeline.from_pretrained(export(tmp_path, tmp_path / "model"))
    assert pipe.dit.cfg.self_cond
    estimates = []
    pipe.dit.register_forward_pre_hook(lambda module, args: estimates.append(args[4]))
    pipe.generate(GenerationRequest(prompt="a red circle moving left", height=32, width=32, frames=5), progress=False)
    assert len(estimates) == 3 and not estimates[0][:1].any() and all(e[:1].abs().sum() > 0 for e in estimates[1:])


@pytest.mark.slow  # inductor compiles the forward and backward graphs: about a minute on 2 cores
def test_compiled_dit_training_follows_the_eager_trajectory(world, tmp_path):
    from train import TrainConfig, Trainer, build_task

    losses = {}
    for compiled in (False, True):
        run_dir = tmp_path / str(compiled)
        cfg = load_config(TrainConfig, None, [
            "task=dit", f"run_dir={run_dir}", f"vae_path={world['vae']}", f"data.manifest={world['manifest']}",
            "steps=3", "optim.lr=1e-2", "optim.warmup_steps=1", "ema.decay=0", "dit.text_dim=64",
            "dit.in_channels=4", "dit.out_channels=4", f"compile={compiled}", "log.every=1",
            *BUCKETS, "data.buckets.frame_counts=[5]", *QUIET])  # clips only: one batch shape, one compile
        trainer = Trainer(cfg, build_task(cfg))
        trainer.run()
        losses[compiled] = [json.loads(line)["loss"] for line in (run_dir / "log.jsonl").read_text().splitlines()]
        module = trainer.engine.module
        assert (module._compiled_call_impl is not None) == compiled  # what nn.Module.compile() sets
        names = dict(module.named_parameters()).keys()
        assert not any("_orig_mod" in name for name in names)  # compiled in place: the export keeps its names
    assert len(losses[True]) == 3 and losses[True] == pytest.approx(losses[False], rel=1e-4)


@pytest.mark.slow  # a VAE learns slowly: 25 steps to a clear drop, ~30 s on an idle 2-core box
def test_vae_loss_falls_with_the_discriminator_on_and_exports_latent_stats(world, tmp_path):
    from train import TrainConfig, Trainer, build_task, export
    from vae.model import CausalVAE

    cfg = load_config(TrainConfig, None, [
        "task=vae", f"run_dir={tmp_path}", f"data.manifest={world['manifest']}", "steps=25", "optim.lr=3e-3",
        "ema.decay=0", "vae_loss.disc_start_step=10", "vae_loss.disc_base_dim=8", "vae_loss.disc_layers=2",
        "vae_stats_clips=4", *BUCKETS, *QUIET])
    trainer = Trainer(cfg, build_task(cfg))
    disc_before = {k: v.clone() for k, v in trainer.task.model.loss_fn.discriminator.state_dict().items()}
    stream = trainer.task.batches(dp_rank=0, dp_size=1)
    probe = [next(stream) for _ in range(3)]
    before = fixed_loss(trainer, probe)
    history = trainer.run()
    after = fixed_loss(trainer, probe)
    # Measured: 0.976 -> 0.933 (-4.4%); a run that does not learn stays within float noise of `before`.
    assert after < 0.96 * before, (before, after)
    assert "vae/disc" in history[-1] and "vae/generator_adv" in history[-1]
    disc_after = trainer.task.model.loss_fn.discriminator.state_dict()
    assert any(not torch.equal(disc_before[k], disc_after[k]) for k in disc_before)  # it trained

    out = export(tmp_path, tmp_path / "model")
    vae = CausalVAE.from_pretrained(out / "vae")
    stats = json.loads((tmp_path / "latent_stats.json").read_text())
    assert vae.cfg.latents_mean == stats["mean"] and len(stats["std"]) == vae.cfg.latent_channels


def test_init_from_starts_a_run_from_saved_weights_with_a_fresh_optimizer(world, tmp_path):
    from safetensors.torch import load_file

    from train import TrainConfig, Trainer, build_task

    vae_run = ["task=vae", f"data.manifest={world['manifest']}", "steps=1", "ema.decay=0", "vae_loss.disc_weight=0",
               *BUCKETS, *QUIET]  # fmt: skip
    saved = load_file(str(world["vae"] / "model.safetensors"))
    cfg = load_config(TrainConfig, None, [*vae_run, f"run_dir={tmp_path / 'a'}", f"init_from={world['vae']}", "seed=5"])
    task = build_task(cfg)
    assert all(torch.equal(task.model.vae.state_dict()[key], value) for key, value in saved.items())
    trainer = Trainer(cfg, task)
    assert trainer.step == 0 and not trainer.engine.optimizer.state  # fine-tuning: nothing else carried over

    # a config that does not match the folder is refused by name, before anything trains
    cfg = load_config(TrainConfig, None, [*vae_run, f"run_dir={tmp_path / 'b'}", f"init_from={world['vae']}",
                                          "vae.latent_channels=8"])  # fmt: skip
    with pytest.raises(ValueError, match=r"does not fit this run's vae config: .*other shapes \['conv1.bias'"):
        build_task(cfg)
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        build_task(load_config(TrainConfig, None, [*vae_run, f"run_dir={tmp_path / 'c'}", f"init_from={tmp_path}"]))


def test_a_run_with_its_encoder_frozen_exports_init_froms_latent_stats(world, tmp_path, capsys):
    """Freezing the encoder and moments projection keeps the latents init_from's, so the export carries
    init_from's statistics instead of measuring them, even before the run has finished; any trainable
    encoder weight means measuring again, and an export before then says it has none."""
    import dataclasses

    from train import TrainConfig, Trainer, build_task, export
    from vae.model import CausalVAE

    source = CausalVAE.from_pretrained(world["vae"])
    channels = source.cfg.latent_channels
    marked = CausalVAE(dataclasses.replace(source.cfg, latents_mean=[0.25] * channels, latents_std=[3.0] * channels))
    marked.load_state_dict(source.state_dict())
    marked.save_pretrained(tmp_path / "marked")
    run = ["task=vae", f"data.manifest={world['manifest']}", "steps=1", "ema.decay=0", "vae_loss.disc_weight=0",
           f"init_from={tmp_path / 'marked'}", "vae_stats_clips=2", *BUCKETS, *QUIET]  # fmt: skip
    stats, mid_run = {}, {}
    for frozen in (r"vae\.(encoder|conv1)\.", r"vae\.encoder\."):
        cfg = load_config(TrainConfig, None, [*run, f"run_dir={tmp_path / str(len(stats))}"])
        cfg.optim.lr_scales = {frozen: 0.0}
        Trainer(cfg, build_task(cfg)).run()
        stats[frozen] = json.loads((Path(cfg.run_dir) / "latent_stats.json").read_text())
        # an export before the run has finished (no latent_stats.json yet) knows only what it can carry
        (Path(cfg.run_dir) / "latent_stats.json").unlink()
        capsys.readouterr()  # drop the run's own output
        folder = export(cfg.run_dir, tmp_path / f"mid-{len(stats)}")
        mid_run[frozen] = CausalVAE.from_pretrained(folder / "vae").cfg, capsys.readouterr().err
    assert stats[r"vae\.(encoder|conv1)\."] == {"mean": [0.25] * channels, "std": [3.0] * channels}
    assert stats[r"vae\.encoder\."]["std"] != [3.0] * channels  # conv1 trained: measured afresh
    carried, warning = mid_run[r"vae\.(encoder|conv1)\."]
    assert (carried.latents_mean, carried.latents_std) == ([0.25] * channels, [3.0] * channels) and not warning
    missing, warning = mid_run[r"vae\.encoder\."]
    assert missing.latents_mean is None and "no latent statistics" in warning and "python -m vae.stats" in warning


def sp_worker(overrides_json: str) -> None:
    """One rank of a DiT run with the given overrides; rank 0 writes the losses and final EMA weights."""
    from dit import parallel
    from train import TrainConfig, Trainer, build_task

    overrides = json.loads(overrides_json)
    cfg = load_config(TrainConfig, None, overrides)
    trainer = Trainer(cfg, build_task(cfg))
    history = trainer.run()
    if os.environ["RANK"] == "0":
        (Path(cfg.run_dir) / "result.json").write_text(json.dumps({
            "module": type(trainer.engine.module).__name__,
            "losses": [h["loss"] for h in history],
            "grad_norms": [h["grad_norm"] for h in history],
            "ema": {k: v.tolist() for k, v in trainer.ema.weights.items()}}))
    parallel.destroy_distributed()


def test_dit_with_sequence_parallel_on_two_ranks_matches_one_process(world, tmp_path):
    """Ulysses over 2 ranks (one data-parallel group): the same batches, noise, losses and weights as one
    process. Checkpointed blocks recompute their sharded attention in backward; condition masks give
    per-frame and per-token timesteps."""
    from test_train import finish

    from dit.parallel import free_port
    from train import TrainConfig, Trainer, build_task

    common = ["task=dit", f"vae_path={world['vae']}", f"data.manifest={world['manifest']}", "steps=4",
              "optim.lr=1e-2", "ema.decay=0.5", "dit.gradient_checkpointing=true", "cond.none=0.4",
              "cond.i2v=0.2", "cond.extend_head=0", "cond.extend_tail=0", "cond.loop=0", "cond.keyframes=0.1",
              "cond.inpaint=0.3", *BUCKETS, *QUIET, "checkpoint.export_at_end=false", "parallel.timeout_s=60"]
    cfg = load_config(TrainConfig, None, [*common, f"run_dir={tmp_path / 'one'}"])
    trainer = Trainer(cfg, build_task(cfg))
    history = trainer.run()

    overrides = [*common, f"run_dir={tmp_path / 'sp'}", "parallel.sp_size=2"]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
           "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    code = f"from test_train_tasks import sp_worker; sp_worker({json.dumps(json.dumps(overrides))})"
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(2)]
    for returncode, text in finish(procs, timeout=150):
        assert returncode == 0, text[-3000:]
    result = json.loads((tmp_path / "sp" / "result.json").read_text())
    assert result["module"] == "SequenceParallelDiT"  # both ranks running the whole DiT would match too
    assert result["losses"] == pytest.approx([h["loss"] for h in history], rel=1e-5)
    # Adam hides a gradient that is off by a constant factor; the norm (before clipping) does not.
    assert result["grad_norms"] == pytest.approx([h["grad_norm"] for h in history], rel=1e-4)
    # Adam divides by sqrt(v): on near-zero gradients float reordering moves an update by up to ~1e-4 of
    # its size (lr=1e-2 here), hence the absolute tolerance; a wrong gradient moves weights by ~1e-2.
    for name, value in trainer.ema.weights.items():
        torch.testing.assert_close(torch.tensor(result["ema"][name]), value, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("task", ["vae", "dit"])
def test_decoded_cache_setting_reaches_the_pixel_dataset(world, tmp_path, task):
    from train import TrainConfig, build_task

    def dataset(*overrides: str):
        cfg = load_config(TrainConfig, None, [
            f"task={task}", f"run_dir={tmp_path}", f"vae_path={world['vae']}", f"data.manifest={world['manifest']}",
            "dit.text_dim=64", "dit.in_channels=4", "dit.out_channels=4", *BUCKETS, *QUIET, *overrides])
        return build_task(cfg).stream.dataset

    assert dataset().decoded is None  # off by default: large datasets read each file once an epoch
    assert dataset("data.decoded_cache_mb=8").decoded.budget == 8 * 2**20
