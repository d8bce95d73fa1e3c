"""Training checkpoints: atomic folders of safetensors + JSON, independent of ranks and ZeRO stage.

A checkpoint is one folder, `RUN_DIR/checkpoints/step_00000100/`:

    model.safetensors      full fp32 master weights, by parameter name
    ema.safetensors        EMA weights (when EMA is on)
    optimizer.safetensors  Adam moments "exp_avg.<name>" and "exp_avg_sq.<name>", full, fp32
    rng_rank<r>.safetensors  each rank's torch (and CUDA) generator states
    state.json             step, optimizer step, loss scale, sampler state, counters: everything else
    config.yaml            the resolved training config

Nothing is pickled. Weights and optimizer moments are stored whole (gathered from the ZeRO shards with
DeepSpeed's `safe_get_full_*` helpers), so a run can resume on a different number of GPUs or ZeRO
stage. DeepSpeed's own `save_checkpoint` would pickle the sharded optimizer and tie the checkpoint to
the world size.

Atomicity: the folder is written as `.tmp-step_...`, then renamed; only then is `latest` (a one-line
text file naming the folder) replaced, itself via a temporary file and `os.replace`. A process killed at
any point leaves `latest` naming a complete checkpoint; stale `.tmp-*` folders are removed on the next save.

Every rank must call `save_checkpoint` and `load_checkpoint` (gathering shards is collective); rank 0
writes the shared files. Multi-node runs need RUN_DIR on a shared filesystem.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from dit import parallel

ADAM_KEYS = ("exp_avg", "exp_avg_sq")
LATEST = "latest"


# ----------------------------------------------------------------------------------------------------
# Full (unsharded) training state from a DeepSpeed engine, and back
# ----------------------------------------------------------------------------------------------------
def _is_sharded(param: torch.nn.Parameter) -> bool:
    # ZeRO-3 params carry ds_id; ZeRO-1/2 and DeepSpeed's bf16 optimizer map params to fp32 fragments.
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def _base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch AdamW underneath DeepSpeed's wrappers (the wrappers keep it as `.optimizer`)."""
    optimizer = engine.optimizer
    return optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer


def gather_state(engine) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
    """(fp32 master weights, Adam moments, optimizer step count), full on every rank. Collective."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    base = _base_optimizer(engine)
    step = _optimizer_step(base)
    weights, moments = {}, {}
    for name, param in engine.module.named_parameters():
        if _is_sharded(param):
            weights[name] = safe_get_full_fp32_param(param).detach().float().cpu()
            for key in ADAM_KEYS:
                value = safe_get_full_optimizer_state(param, key) if step else None
                moments[f"{key}.{name}"] = (value.detach().float().cpu() if value is not None
                                            else torch.zeros_like(weights[name]))
        else:  # ZeRO stage 0 in fp32: the torch optimizer owns the parameter itself
            weights[name] = param.detach().float().cpu()
            state = base.state.get(param, {})
            for key in ADAM_KEYS:
                moments[f"{key}.{name}"] = state[key].detach().float().cpu() if key in state else torch.zeros_like(weights[name])
    return weights, moments, step


def _optimizer_step(base: torch.optim.Optimizer) -> int:
    for state in base.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def restore_state(engine, weights: dict[str, torch.Tensor], moments: dict[str, torch.Tensor], step: int) -> None:
    """Put full weights and Adam moments back into a (possibly sharded) engine. Collective."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    names = {name for name, _ in engine.module.named_parameters()}
    if names != set(weights):
        missing, unexpected = sorted(names - set(weights)), sorted(set(weights) - names)
        raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    base = _base_optimizer(engine)
    _materialize_adam_state(base, _optimizer_tensors(engine), step)
    if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
        # ZeRO-1/2 and bf16 link each parameter to its slice of the optimizer state only after the first
        # step; the state we just created must be linked so the safe_set helpers can reach it.
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    for name, param in engine.module.named_parameters():
        value = weights[name]
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):  # a no-op below ZeRO-3
            param.data.copy_(value.to(param.dtype).view_as(param.data))
        if hasattr(param, "ds_id"):
            for key in (None, *ADAM_KEYS):
                full = value if key is None else moments[f"{key}.{name}"]
                _set_zero3_partition(engine.optimizer, param, full.to(_device_of(engine)), key)
        elif _is_sharded(param):
            safe_set_full_fp32_param(param, value.to(_device_of(engine)))
            for key in ADAM_KEYS:
                safe_set_full_optimizer_state(param, moments[f"{key}.{name}"].to(_device_of(engine)), key)
        else:
            state = base.state[param]
            for key in ADAM_KEYS:
                state[key].copy_(moments[f"{key}.{name}"])


def _set_zero3_partition(optimizer, param: torch.nn.Parameter, full: torch.Tensor, key: str | None) -> None:
    """Copy this rank's slice of a full tensor into ZeRO-3's fp32 master (key None) or Adam state.

    DeepSpeed's `safe_set_full_*` reads past the end for the last rank when a parameter's size does not
    divide by the number of ranks (its partitions are padded), so we slice here and leave the padding 0.
    """
    partition, _ = optimizer._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
    start = partition.numel() * optimizer._get_param_partition_rank(param)
    piece = full.flatten()[start:start + partition.numel()]  # shorter (or empty) in the padded tail
    partition.data.zero_()
    partition.data[: piece.numel()].copy_(piece)


def _optimizer_tensors(engine) -> list[torch.Tensor]:
    """The tensors AdamW keeps state for. ZeRO-3 empties its param groups between steps and hands AdamW
    one flat fp32 partition per group only while stepping; everyone else keeps them in the groups."""
    if hasattr(engine.optimizer, "fp32_partitioned_groups_flat"):
        return list(engine.optimizer.fp32_partitioned_groups_flat)
    return [tensor for group in _base_optimizer(engine).param_groups for tensor in group["params"]]


def _materialize_adam_state(base: torch.optim.Optimizer, tensors: list[torch.Tensor], step: int) -> None:
    """Create AdamW's lazily built per-tensor state (zeros, then overwritten) with the saved step count."""
    for tensor in tensors:
        state = base.state[tensor]
        for key in ADAM_KEYS:
            state.setdefault(key, torch.zeros_like(tensor, memory_format=torch.preserve_format))
        # AdamW keeps `step` as a float32 scalar tensor on the CPU (non-capturable mode).
        state["step"] = torch.tensor(float(step))


def _device_of(engine) -> torch.device:
    return next(engine.module.parameters()).device


def rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------------------------------
# Folders on disk
# ----------------------------------------------------------------------------------------------------
def model_folder(folder: str | os.PathLike, *, part: str) -> Path:
    """The folder holding `part`'s weights: `folder` itself (a `save_pretrained` folder) or its `part`/
    (an export holding several parts)."""
    folder = Path(folder)
    return folder / part if (folder / part / "model.safetensors").is_file() else folder


def load_model_folder(model: torch.nn.Module, folder: str | os.PathLike, *, part: str) -> Path:
    """Copy the weights of a saved model folder (`save_pretrained`, or an export holding `part`/) into `model`.

    Every tensor must match by name and shape; the error names the ones that do not, so a config that
    differs from the folder's is caught here and not as a silently half-loaded model.
    """
    from safetensors.torch import load_file

    folder = model_folder(folder, part=part)
    path = folder / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"init_from={folder}: no model.safetensors there or in {folder / part}")
    weights, own = load_file(str(path)), model.state_dict()
    missing, unexpected = sorted(own.keys() - weights.keys()), sorted(weights.keys() - own.keys())
    reshaped = sorted(key for key in own.keys() & weights.keys() if own[key].shape != weights[key].shape)
    if missing or unexpected or reshaped:
        raise ValueError(
            f"init_from={path} does not fit this run's {part} config: missing {missing[:4]}, unexpected "
            f"{unexpected[:4]}, other shapes {reshaped[:4]} (set the {part} section to the folder's config.json)"
        )
    model.load_state_dict({key: value.to(own[key].dtype) for key, value in weights.items()})
    return path


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(
    root: Path,
    *,
    step: int,
    engine,
    trainer_state: dict[str, Any],
    config_yaml: str,
    ema: dict[str, torch.Tensor] | None = None,
    extra_rng: dict[str, torch.Tensor] | None = None,
    keep: int = 3,
) -> Path:
    """Write `root/step_XXXXXXXX` atomically, point `root/latest` at it, keep the newest `keep` folders.

    `trainer_state` must be JSON-serialisable; `extra_rng` holds this rank's other generator states
    (e.g. the training generator) as tensors. Every rank calls this.
    """
    from safetensors.torch import save_file

    root = Path(root)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{final.name}"
    if parallel.is_main():
        for stale in root.glob(".tmp-*"):  # left by a run killed mid-save
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    parallel.barrier()
    rng = {**rng_state(), **(extra_rng or {})}
    save_file({k: v.contiguous() for k, v in rng.items()}, tmp / f"rng_rank{parallel.rank()}.safetensors")
    weights, moments, optimizer_step = gather_state(engine)
    if parallel.is_main():
        save_file(weights, tmp / "model.safetensors")
        save_file(moments, tmp / "optimizer.safetensors")
        if ema is not None:
            save_file({k: v.detach().float().cpu().contiguous() for k, v in ema.items()}, tmp / "ema.safetensors")
        state = {"step": step, "optimizer_step": optimizer_step, "world_size": parallel.world_size(),
                 "loss_scale": _loss_scale(engine), **trainer_state}
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
        (tmp / "config.yaml").write_text(config_yaml)
    parallel.barrier()
    if parallel.is_main():
        _fsync_tree(tmp)
        if final.exists():  # re-saving the same step (e.g. a signal right after a periodic save)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _write_atomically(root / LATEST, final.name + "\n")
        _prune(root, keep=keep, protect=final.name)
    parallel.barrier()
    return final


def _loss_scale(engine) -> float | None:
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    return float(scaler.cur_scale) if scaler is not None else None


def _fsync_tree(folder: Path) -> None:
    # The rename below is only atomic for data that has reached the disk.
    for path in folder.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _prune(root: Path, *, keep: int, protect: str) -> None:
    folders = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in folders[:-keep] if keep > 0 else []:
        if old.name != protect:
            shutil.rmtree(old, ignore_errors=True)


def resolve_checkpoint(root: Path, which: str) -> Path:
    """`which` is "latest" (read `root/latest`) or a checkpoint folder path."""
    if which != LATEST:
        path = Path(which)
        if not (path / "state.json").is_file():
            raise FileNotFoundError(f"--resume {which}: not a checkpoint folder (no state.json)")
        return path
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        raise FileNotFoundError(f"--resume latest: no checkpoint in {root} (missing {pointer})")
    return Path(root) / pointer.read_text().strip()


def load_checkpoint(folder: Path, *, engine) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None, dict[str, torch.Tensor]]:
    """Restore model and optimizer into `engine`; return (state.json, EMA weights or None, this rank's RNG).

    RNG state comes from this rank's file when the world size is unchanged; otherwise rank 0's is used
    (streams then differ from the original run, which is unavoidable with a different rank count).
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    state = json.loads((folder / "state.json").read_text())
    restore_state(engine, load_file(folder / "model.safetensors"), load_file(folder / "optimizer.safetensors"),
                  state["optimizer_step"])
    if state.get("loss_scale") is not None and getattr(engine.optimizer, "loss_scaler", None) is not None:
        engine.optimizer.loss_scaler.cur_scale = state["loss_scale"]
    ema_path = folder / "ema.safetensors"
    ema = load_file(ema_path) if ema_path.is_file() else None
    rank_file = folder / f"rng_rank{parallel.rank()}.safetensors"
    rng = load_file(rank_file if rank_file.is_file() else folder / "rng_rank0.safetensors")
    return state, ema, rng
