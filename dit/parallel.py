"""Everything distributed: process groups, DeepSpeed config assembly, memory estimates, Ulysses.

Model code never imports DeepSpeed or torch.distributed; `train.py` calls in here. DeepSpeed is
imported inside the functions that need it, so importing this module does not load it.

Ranks. One plain process (no launcher) becomes a world of one: we fill in the rendezvous variables
that `deepspeed`/`torchrun` would have set, so the single-process and multi-process runs take the
same code path through the DeepSpeed engine. Every process group gets a timeout, so a rank that dies
makes its peers fail with an error instead of waiting forever.

Ulysses sequence parallelism. Ranks are split into groups of `sp_size` consecutive ranks; inside a
group every rank holds 1/sp_size of the video tokens of the same sample. Self-attention needs every
token, so before it an all-to-all trades "all heads of my tokens" for "my heads of all tokens":

    (B, heads, L/sp, Dh)  --all-to-all-->  (B, heads/sp, L, Dh)  --attention-->  --inverse-->  (B, heads, L/sp, Dh)

Everything else in a block (projections, norms, RoPE, MLP, cross-attention to the short text) is per
token, so it runs on the local shard unchanged. `SequenceParallelDiT` applies this to the whole model
from outside: every rank of a group gets the same full inputs, embeds them, keeps its contiguous 1/sp of
the tokens (with the matching RoPE rows and timestep groups), runs the blocks and the head on that shard
and all-gathers the head's output, so every rank returns the full prediction and computes the same loss.

Gradients. The gather's backward sums the output gradients of all ranks of the group (a reduce-scatter).
All ranks compute the same loss, so each rank's share comes back sp times: rank r's parameter gradient is
sp x the part of the full gradient that its tokens contribute, and the mean over the group is exactly
the one-process gradient. DeepSpeed averages gradients over the whole world (data-parallel x sequence-
parallel ranks), so this is the mean over data-parallel groups of the full-sequence gradient: no loss
scaling, and the logged loss is the real one (tests/test_parallel.py checks both).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from dit.attention import set_sequence_parallel
from dit.layers import unpatchify
from dit.model import DiT, DiTConfig, DiTState

PRECISIONS = ("fp32", "bf16", "fp16")
ZERO_STAGES = (0, 1, 2, 3)


# ----------------------------------------------------------------------------------------------------
# Process groups and rank helpers
# ----------------------------------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port on the loopback that is free right now (for a single-node process group)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(*, timeout_s: float = 600.0) -> None:
    """Join (or, without a launcher, create) the default process group: gloo on CPU, NCCL on GPUs.

    `timeout_s` bounds every collective: when a rank crashes, the others raise after at most this long.
    """
    if dist.is_initialized():
        return
    if "WORLD_SIZE" not in os.environ:  # plain `python train.py`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    import deepspeed

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s), verbose=False)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is True on at least one (e.g. a NaN loss or a stop signal)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def mean_over_ranks(value: float) -> float:
    """The mean of a Python float over all ranks (for logging the global loss)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor)
    return tensor.item() / dist.get_world_size()


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------
# DeepSpeed config assembly
# ----------------------------------------------------------------------------------------------------
def build_deepspeed_config(
    *,
    micro_batch_size: int,
    grad_accum_steps: int,
    data_parallel_size: int,
    zero_stage: int,
    precision: str,
    grad_clip: float,
    user_config: dict | None = None,
) -> dict:
    """The DeepSpeed JSON config our YAML implies, with a user's JSON merged over it (user wins).

    The optimizer and the LR schedule are not in here: train.py passes a torch AdamW (so DeepSpeed does
    not compile its fused optimizer, which fails on CPU) and sets the learning rate every step itself.
    """
    if zero_stage not in ZERO_STAGES:
        raise ValueError(f"zero_stage={zero_stage}: must be one of {ZERO_STAGES}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: must be one of {PRECISIONS}")
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "train_batch_size": micro_batch_size * grad_accum_steps * data_parallel_size,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        # Dynamic loss scaling is what makes fp16 training survive; start high, halve on overflow.
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if zero_stage == 3:
        # Keep whole parameters gathered between uses only for small layers; these are DeepSpeed's
        # defaults spelled out so a user JSON can see what to tune.
        config["zero_optimization"].update(stage3_max_live_parameters=int(1e9), stage3_prefetch_bucket_size=int(5e7))
    if user_config:
        config = merge_configs(config, user_config)
    batch = config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"] * data_parallel_size
    if config["train_batch_size"] != batch:
        raise ValueError(
            f"train_batch_size={config['train_batch_size']}: must equal micro batch "
            f"{config['train_micro_batch_size_per_gpu']} x accumulation {config['gradient_accumulation_steps']} "
            f"x data-parallel ranks {data_parallel_size} = {batch}"
        )
    return config


def merge_configs(base: dict, override: dict) -> dict:
    """Recursive dict merge: values in `override` replace those in `base`; nested dicts merge."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_configs(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


# ----------------------------------------------------------------------------------------------------
# Memory estimates (DeepSpeed's own estimators, on a parameter count)
# ----------------------------------------------------------------------------------------------------
def estimate_model_states_gib(
    num_params: int, *, zero_stage: int, gpus_per_node: int, nodes: int = 1, largest_layer_params: int = 0,
    offload: bool = False,
) -> tuple[float, float]:
    """(GiB per GPU, GiB CPU per node) for parameters, gradients and Adam states: activations excluded.

    ZeRO-2 and ZeRO-3 use DeepSpeed's estimators, which count per parameter 2 bytes of 16-bit weights
    plus 18 bytes (16-bit and fp32 gradients, fp32 master weights, two Adam moments) sharded over the
    GPUs. Stages 0 and 1 follow the same accounting: stage 0 shards nothing (20 bytes); stage 1 shards
    the 12 bytes of master weights and moments.
    """
    gib = 2**30
    total_gpus = gpus_per_node * nodes
    if zero_stage in (0, 1):
        if offload:
            raise ValueError(f"offload=True: needs zero_stage 2 or 3, got {zero_stage}")
        sharded = 12 / total_gpus if zero_stage == 1 else 12
        return num_params * (8 + sharded) / gib, 0.0
    if zero_stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        cpu, gpu = estimate_zero2_model_states_mem_needs(
            num_params, num_gpus_per_node=gpus_per_node, num_nodes=nodes, cpu_offload=offload)
        return gpu / gib, cpu / gib
    if zero_stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            num_params, largest_layer_params, num_gpus_per_node=gpus_per_node, num_nodes=nodes,
            cpu_offload=offload, cpu_offload_params=offload, zero_init=True)
        return gpu / gib, cpu / gib
    raise ValueError(f"zero_stage={zero_stage}: must be one of {ZERO_STAGES}")


# ----------------------------------------------------------------------------------------------------
# Ulysses sequence parallelism
# ----------------------------------------------------------------------------------------------------
def new_sequence_parallel_group(sp_size: int) -> tuple[dist.ProcessGroup | None, int, int]:
    """Split the world into groups of `sp_size` consecutive ranks.

    Returns (this rank's sequence group, data-parallel rank, data-parallel size). Every rank must call
    this (group creation is collective). With sp_size = 1 the group is None and nothing is sharded.
    """
    world = world_size()
    if sp_size < 1 or world % sp_size:
        raise ValueError(f"sp_size={sp_size}: must be >= 1 and divide the number of ranks {world}")
    if sp_size == 1:
        return None, rank(), world
    mine = None
    for start in range(0, world, sp_size):
        group = dist.new_group(list(range(start, start + sp_size)))
        if start <= rank() < start + sp_size:
            mine = group
    return mine, rank() // sp_size, world // sp_size


def check_heads_divisible(num_heads: int, sp_size: int) -> None:
    if num_heads % sp_size:
        raise ValueError(
            f"sp_size={sp_size}: Ulysses gives each rank num_heads/sp_size heads, so it must divide "
            f"num_heads={num_heads}; valid sp_size values: {[d for d in range(1, num_heads + 1) if num_heads % d == 0]}"
        )


def _all_to_all(x: torch.Tensor, group: dist.ProcessGroup, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Split `x` into sp chunks along `scatter_dim`, send chunk j to rank j, concatenate what arrives
    (in rank order) along `gather_dim`."""
    parts = dist.get_world_size(group)
    send = torch.stack(x.chunk(parts, dim=scatter_dim)).contiguous()  # (sp, ...chunk)
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    return torch.cat(received.unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    """The all-to-all with its inverse as the backward pass."""

    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim):  # noqa: ANN001 (autograd signature)
        ctx.group, ctx.scatter_dim, ctx.gather_dim = group, scatter_dim, gather_dim
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        return _all_to_all(grad, ctx.group, ctx.gather_dim, ctx.scatter_dim), None, None, None


def heads_to_sequence(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """(B, heads, L/sp, Dh) on each rank -> (B, heads/sp, L, Dh): scatter heads, gather the sequence."""
    return _AllToAll.apply(x, group, 1, 2)


def sequence_to_heads(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """(B, heads/sp, L, Dh) -> (B, heads, L/sp, Dh): the inverse of `heads_to_sequence`."""
    return _AllToAll.apply(x, group, 2, 1)


class UlyssesAttention:
    """The hook for `dit.attention.set_sequence_parallel`: all-to-all around the real attention call."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.sp_size = dist.get_world_size(group)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention: Callable) -> torch.Tensor:
        check_heads_divisible(q.shape[1], self.sp_size)
        q, k, v = (heads_to_sequence(t, self.group) for t in (q, k, v))  # (B, heads/sp, L, Dh)
        out = attention(q, k, v)  # (B, heads/sp, L, Dh)
        return sequence_to_heads(out, self.group)  # (B, heads, L/sp, Dh)


def shard_sequence(x: torch.Tensor, group: dist.ProcessGroup, dim: int = 1) -> torch.Tensor:
    """This rank's contiguous slice of `x` along `dim` (the token axis); L must divide by sp_size."""
    parts = dist.get_world_size(group)
    if x.shape[dim] % parts:
        raise ValueError(f"sequence length {x.shape[dim]}: must be divisible by sp_size={parts}")
    return x.chunk(parts, dim=dim)[dist.get_rank(group)]


class _GatherSequence(torch.autograd.Function):
    """All-gather equal shards along `dim`; the backward sums the gradient over the group (every rank's
    loss depends on every shard) and returns this rank's slice of the sum."""

    @staticmethod
    def forward(ctx, x, group, dim):  # noqa: ANN001 (autograd signature)
        ctx.group, ctx.dim, ctx.size = group, dim, x.shape[dim]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        grad = grad.contiguous().clone()  # all_reduce works in place; autograd's buffer is not ours to change
        dist.all_reduce(grad, group=ctx.group)  # a reduce-scatter as all-reduce + slice: gloo has no reduce-scatter
        return grad.narrow(ctx.dim, dist.get_rank(ctx.group) * ctx.size, ctx.size), None, None


def gather_sequence(x: torch.Tensor, group: dist.ProcessGroup, dim: int = 1) -> torch.Tensor:
    """Concatenate every rank's shard along `dim` (the inverse of `shard_sequence`); differentiable, with
    the gradient of the sum of all ranks' losses (module doc)."""
    return _GatherSequence.apply(x, group, dim)


@contextmanager
def ulysses_attention(group: dist.ProcessGroup) -> Iterator[None]:
    """Route every self-attention through the Ulysses all-to-all over `group` inside the block.

    Blocks recomputed by gradient checkpointing run again in backward, so with checkpointing the backward
    must run inside this too (train.py does). Contexts do not nest: leaving one restores plain attention.
    """
    set_sequence_parallel(UlyssesAttention(group))
    try:
        yield
    finally:
        set_sequence_parallel(None)


class SequenceParallelDiT(DiT):
    """A DiT whose forward shards the video tokens over `group` (Ulysses); same parameters, same names.

    Called with the same full inputs on every rank of the group, it returns the same full prediction on
    every rank (see the module doc for the gradients). Needs num_heads and the token count L divisible by
    the group size; any frame count works.
    """

    def __init__(self, cfg: DiTConfig, group: dist.ProcessGroup):
        super().__init__(cfg)
        self.group = group
        self.sp_size = dist.get_world_size(group)
        check_heads_divisible(cfg.num_heads, self.sp_size)

    @classmethod
    def from_model(cls, model: DiT, group: dist.ProcessGroup) -> SequenceParallelDiT:
        """Take over `model`'s parameter tensors (no copy); use the result in its place from then on."""
        if not isinstance(model, DiT):
            raise ValueError(f"sequence parallelism shards a DiT's tokens; got a {type(model).__name__}")
        with torch.device("meta"):  # no second initialisation: the weights are assigned just below
            sharded = cls(model.cfg, group)
        sharded.load_state_dict(model.state_dict(), strict=True, assign=True)
        return sharded.train(model.training)

    def shard(self, state: DiTState) -> DiTState:
        """This rank's contiguous 1/sp of the tokens (B, L/sp, D), with their RoPE rows and timestep groups."""
        num_tokens, groups = state.tokens.shape[1], state.time_mod.shape[1]
        if num_tokens % self.sp_size:
            raise ValueError(
                f"latent token grid (T'', H'', W'')={state.grid} has L={num_tokens} tokens: must be divisible by "
                f"sp_size={self.sp_size}; use bucket sizes (frames, height, width) whose token count it divides"
            )
        rank = dist.get_rank(self.group)
        local = num_tokens // self.sp_size  # tokens [rank * local, (rank + 1) * local) are this rank's

        # The timesteps come in G groups of L/G consecutive tokens (G = 1, token frames, or L).
        if groups == 1:
            time_emb, time_mod = state.time_emb, state.time_mod  # (B, 1, D), (B, 1, 6, D): shared by all
        elif groups % self.sp_size == 0:  # this rank's tokens are whole groups: the same slice of groups
            per_rank = groups // self.sp_size
            time_emb = state.time_emb.narrow(1, rank * per_rank, per_rank)  # (B, G/sp, D)
            time_mod = state.time_mod.narrow(1, rank * per_rank, per_rank)  # (B, G/sp, 6, D)
        else:
            # Per-frame timesteps with frames not divisible by sp (a frame straddles two ranks): give each local
            # token its group's vectors, the same arithmetic per token. Only this rank's rows are gathered.
            owner = torch.arange(rank * local, (rank + 1) * local, device=state.time_mod.device) // (
                num_tokens // groups)  # (L/sp,)
            time_emb = state.time_emb.index_select(1, owner)  # (B, L/sp, D)
            time_mod = state.time_mod.index_select(1, owner)  # (B, L/sp, 6, D)
        return dataclasses.replace(
            state,
            tokens=state.tokens.narrow(1, rank * local, local),  # (B, L/sp, D)
            time_emb=time_emb,
            time_mod=time_mod,
            rope=tuple(table.narrow(0, rank * local, local) for table in state.rope),  # (L/sp, Dh/2) each
        )

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
        x0_prev: torch.Tensor | None = None, frame_local: bool = False,
    ) -> torch.Tensor:
        # The same full state on every rank; frame-local attention works as is (the all-to-all gathers whole frames).
        state = self.embed(x, t, text, text_mask, x0_prev, frame_local)
        local = self.shard(state)
        with ulysses_attention(self.group):
            tokens = self.run_blocks(local)  # (B, L/sp, D)
        out = self.head_tokens(local, tokens)  # (B, L/sp, pt*ph*pw*C_out)
        out = gather_sequence(out, self.group)  # (B, L, pt*ph*pw*C_out)
        return unpatchify(out, state.grid, self.cfg.patch_size)  # (B, C_out, T', H', W')
