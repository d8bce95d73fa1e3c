"""dit/parallel.py: DeepSpeed config assembly, memory estimates, and Ulysses on 2 gloo ranks.

The Ulysses test runs a real DiT block (RoPE, QK-norm, cross-attention) on token shards with the
all-to-all hook installed and compares with the same block on the whole sequence in one process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dit import parallel
from dit.parallel import free_port

ROOT = Path(__file__).resolve().parents[1]


def test_deepspeed_config_follows_yaml_and_user_json_wins():
    config = parallel.build_deepspeed_config(micro_batch_size=2, grad_accum_steps=3, data_parallel_size=4,
                                             zero_stage=2, precision="bf16", grad_clip=0.5,
                                             user_config={"zero_optimization": {"overlap_comm": True}})
    assert config["train_batch_size"] == 2 * 3 * 4
    assert config["zero_optimization"] == {"stage": 2, "overlap_comm": True}  # merged, not replaced
    assert config["bf16"]["enabled"] and not config["fp16"]["enabled"]
    assert config["gradient_clipping"] == 0.5


def test_inconsistent_user_batch_size_is_a_clear_error():
    with pytest.raises(ValueError, match=r"train_batch_size=10: must equal micro batch 2 x accumulation 1"):
        parallel.build_deepspeed_config(micro_batch_size=2, grad_accum_steps=1, data_parallel_size=2, zero_stage=0,
                                        precision="fp32", grad_clip=1.0, user_config={"train_batch_size": 10})


def test_heads_must_divide_by_sp_size():
    parallel.check_heads_divisible(12, 4)
    with pytest.raises(ValueError, match=r"sp_size=5.*num_heads=12.*\[1, 2, 3, 4, 6, 12\]"):
        parallel.check_heads_divisible(12, 5)


def test_memory_estimate_shrinks_with_sharding_and_matches_deepspeed_formula():
    params = 1_300_000_000
    one, _ = parallel.estimate_model_states_gib(params, zero_stage=2, gpus_per_node=1)
    eight, _ = parallel.estimate_model_states_gib(params, zero_stage=2, gpus_per_node=8)
    # ZeRO-2 without offload: 2 bytes of 16-bit weights + 18 bytes sharded over N GPUs (DeepSpeed's count).
    assert eight == pytest.approx(params * (2 + 18 / 8) / 2**30, rel=1e-6)
    stage0, _ = parallel.estimate_model_states_gib(params, zero_stage=0, gpus_per_node=8)
    assert stage0 == pytest.approx(params * 20 / 2**30) == pytest.approx(one)  # ZeRO on 1 GPU shards nothing
    assert eight < one
    zero3, _ = parallel.estimate_model_states_gib(params, zero_stage=3, gpus_per_node=8, largest_layer_params=10**7)
    assert zero3 < eight


def block_inputs():
    """A debug-sized DiT block and inputs: tokens (B, L, D) on a (2, 4, 4) grid, text, modulation."""
    from dit.layers import rope_angles
    from dit.model import DiTBlock, DiTConfig

    torch.manual_seed(0)
    cfg = DiTConfig.from_preset("debug", num_heads=4, dim=48)
    block = DiTBlock(cfg)
    with torch.no_grad():
        for p in block.parameters():  # leave the zero-init: every branch must contribute
            p.add_(0.1 * torch.randn_like(p))
    grid = (2, 4, 4)
    tokens = torch.randn(2, 32, cfg.dim)  # (B, L, D)
    time_mod = torch.randn(2, 1, 6, cfg.dim)  # (B, G, 6, D)
    context = torch.randn(2, 5, cfg.dim)  # (B, S, D)
    context_mask = torch.tensor([[True] * 5, [True, True, False, False, False]])  # (B, S)
    angles = rope_angles(grid, cfg.head_dim, cfg.rope_theta, torch.device("cpu"))  # (L, Dh/2)
    return block, tokens, time_mod, context, context_mask, angles


def ulysses_worker() -> None:
    """One rank: run the block on its token shard with the Ulysses hook; rank 0 writes the gathered output."""
    from dit.attention import set_sequence_parallel

    parallel.init_distributed(timeout_s=60)
    group, _, _ = parallel.new_sequence_parallel_group(2)
    set_sequence_parallel(parallel.UlyssesAttention(group))
    block, tokens, time_mod, context, context_mask, angles = block_inputs()
    tokens = parallel.shard_sequence(tokens, group).requires_grad_()  # (B, L/2, D)
    angles = parallel.shard_sequence(angles, group, dim=0)  # (L/2, Dh/2)
    out = block(tokens, time_mod, context, context_mask, (angles.cos(), angles.sin()))  # (B, L/2, D)
    out.square().sum().backward()  # the all-to-all's backward is its inverse: gradients must match too
    full = parallel.gather_sequence(out.detach(), group)  # (B, L, D)
    grads = {name: p.grad for name, p in block.named_parameters()}
    for grad in grads.values():
        torch.distributed.all_reduce(grad)  # each rank holds the gradient of its shard's part of the loss
    if parallel.is_main():
        torch.save({"out": full, "grads": grads}, os.environ["OUT"])
    parallel.destroy_distributed()


def run_two_ranks(worker: str, out_file: Path) -> None:
    """Run `worker` from this file on 2 gloo ranks (OUT=out_file); fail with its log, never hang."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
           "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "OUT": str(out_file),
           "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    code = f"from test_parallel import {worker}; {worker}()"
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(2)]
    try:
        logs = [proc.communicate(timeout=120)[0].decode(errors="replace") for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    for proc, log in zip(procs, logs, strict=True):
        assert proc.returncode == 0, log[-3000:]


def test_ulysses_on_two_ranks_matches_one_process(tmp_path):
    block, tokens, time_mod, context, context_mask, angles = block_inputs()
    expected = block(tokens, time_mod, context, context_mask, (angles.cos(), angles.sin()))  # (B, L, D)
    expected.square().sum().backward()
    out_file = tmp_path / "out.pt"
    run_two_ranks("ulysses_worker", out_file)
    result = torch.load(out_file)
    torch.testing.assert_close(result["out"], expected.detach(), rtol=1e-5, atol=1e-5)
    for name, p in block.named_parameters():
        torch.testing.assert_close(result["grads"][name], p.grad, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# The whole DiT under Ulysses: SequenceParallelDiT on 2 ranks against DiT in one process
# ----------------------------------------------------------------------------------------------------
DIT_CASES = {  # name -> (latent frames T', timestep mode, gradient checkpointing); H' = W' = 4, patch (1, 2, 2)
    "per_sample": (2, "sample", False),
    "per_frame": (2, "frame", False),
    "per_token": (2, "token", False),
    "per_frame_checkpointed": (2, "frame", True),
    "per_frame_straddling": (3, "frame", False),  # 3 frames of 4 tokens on 2 ranks: frame 1 is split
}


def dit_case(name: str):
    """A debug DiT with every zero-initialised branch made live, inputs on a (T', 2, 2) token grid, padded
    text, distinct timesteps per sample, per latent frame or per token, and a random output weighting."""
    from dit.model import DiT, DiTConfig

    frames, mode, checkpointing = DIT_CASES[name]
    torch.manual_seed(0)
    model = DiT(DiTConfig.from_preset("debug", gradient_checkpointing=checkpointing))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 4, frames, 4, 4)  # (B, C, T', H', W')
    t = {"sample": 1000 * torch.rand(2),  # (B,)
         "frame": 1000 * torch.rand(2, frames),  # (B, T')
         "token": 1000 * torch.rand(2, frames * 4)}[mode]  # (B, L)
    text = torch.randn(2, 5, model.cfg.text_dim)  # (B, S, Dt)
    text_mask = torch.tensor([[True] * 5, [True, True, False, False, False]])  # (B, S)
    weight = torch.randn(2, 4, frames, 4, 4)  # makes every output position's gradient different
    return model, (x, t, text, text_mask), weight


def error_on_odd_token_count(model) -> str:
    """The message for a (1, 1, 3) token grid, which 2 ranks cannot split."""
    text, text_mask = torch.randn(1, 3, model.cfg.text_dim), torch.ones(1, 3, dtype=torch.bool)
    try:
        model(torch.randn(1, 4, 1, 2, 6), torch.tensor([5.0]), text, text_mask)
    except ValueError as err:
        return str(err)
    return "no error"


def dit_worker() -> None:
    """One rank: each case's prediction and the group mean of each parameter's gradient, to OUT.rank."""
    parallel.init_distributed(timeout_s=60)
    group, _, _ = parallel.new_sequence_parallel_group(2)
    results = {}
    for name in DIT_CASES:
        model, inputs, weight = dit_case(name)
        sharded = parallel.SequenceParallelDiT.from_model(model, group)
        out = sharded(*inputs)  # (B, C, T', H', W'): the full prediction on every rank
        with parallel.ulysses_attention(group):  # checkpointed blocks recompute their attention in backward
            (out * weight).sum().backward()
        grads = {}
        for param_name, p in sharded.named_parameters():
            torch.distributed.all_reduce(p.grad, group=group)
            grads[param_name] = p.grad / 2  # the mean over the group: what DeepSpeed's world average takes
        with torch.no_grad():
            local = sharded(*inputs, frame_local=True)  # temporal guidance's weak model
        results[name] = {"out": out.detach(), "grads": grads, "frame_local": local}
    results["error"] = error_on_odd_token_count(sharded)
    torch.save(results, f"{os.environ['OUT']}.{parallel.rank()}")
    parallel.destroy_distributed()


def test_sequence_parallel_dit_on_two_ranks_matches_one_process(tmp_path):
    out_file = tmp_path / "out.pt"
    run_two_ranks("dit_worker", out_file)
    ranks = [torch.load(f"{out_file}.{r}") for r in range(2)]
    for name in DIT_CASES:
        model, inputs, weight = dit_case(name)
        expected = model(*inputs)  # (B, C, T', H', W')
        (expected * weight).sum().backward()
        with torch.no_grad():
            local = model(*inputs, frame_local=True)
        for result in ranks:
            torch.testing.assert_close(result[name]["out"], expected.detach(), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(result[name]["frame_local"], local, rtol=1e-5, atol=1e-5)
            for param_name, p in model.named_parameters():
                torch.testing.assert_close(result[name]["grads"][param_name], p.grad, rtol=1e-4, atol=1e-5,
                                           msg=lambda m, n=name, q=param_name: f"{n}: {q}: {m}")
    assert "(1, 1, 3) has L=3 tokens: must be divisible by sp_size=2" in ranks[0]["error"]
