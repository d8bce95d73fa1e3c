"""Load Wan 2.1 transformer weights (original or diffusers layout) into our DiT, and a CLI to convert them.

    python -m dit.convert SRC --out DIR [--dtype bf16] [--num-heads N]

SRC is a folder (or one .safetensors file) holding either
  - the original Wan release: `diffusion_pytorch_model*.safetensors` + Wan's `config.json`
    (keys `dim`, `num_heads`, ...); its parameter names are ours already, or
  - the diffusers `WanTransformer3DModel` folder (`transformer/` of a pipeline): sharded or single
    safetensors + a config with `num_attention_heads`; names are mapped by DIFFUSERS_TO_ORIGINAL.
The layout is detected from the keys. Everything but the number of heads is read from tensor shapes;
heads come from the config file, `--num-heads`, or the known Wan sizes. DIR gets our format:
`model.safetensors` + `config.json` (DiTConfig), loadable with `DiT.from_pretrained(DIR)`.

Image-to-video checkpoints (CLIP image branch: `img_emb`, `k_img`) are refused with a clear error:
this model has no image branch; our image-to-video conditions on clean latent frames instead.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from dit.model import DiT, DiTConfig

# (diffusers name, original name): one row per renamed module; `{i}` is the block index. A row ending in
# "." renames a module prefix (the parameter suffix is kept); any other row renames one whole parameter.
DIFFUSERS_TO_ORIGINAL: list[tuple[str, str]] = [
    ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
    ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
    ("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
    ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
    ("condition_embedder.time_proj.", "time_projection.1."),
    ("blocks.{i}.attn1.to_q.", "blocks.{i}.self_attn.q."),
    ("blocks.{i}.attn1.to_k.", "blocks.{i}.self_attn.k."),
    ("blocks.{i}.attn1.to_v.", "blocks.{i}.self_attn.v."),
    ("blocks.{i}.attn1.to_out.0.", "blocks.{i}.self_attn.o."),
    ("blocks.{i}.attn1.norm_q.", "blocks.{i}.self_attn.norm_q."),
    ("blocks.{i}.attn1.norm_k.", "blocks.{i}.self_attn.norm_k."),
    ("blocks.{i}.attn2.to_q.", "blocks.{i}.cross_attn.q."),
    ("blocks.{i}.attn2.to_k.", "blocks.{i}.cross_attn.k."),
    ("blocks.{i}.attn2.to_v.", "blocks.{i}.cross_attn.v."),
    ("blocks.{i}.attn2.to_out.0.", "blocks.{i}.cross_attn.o."),
    ("blocks.{i}.attn2.norm_q.", "blocks.{i}.cross_attn.norm_q."),
    ("blocks.{i}.attn2.norm_k.", "blocks.{i}.cross_attn.norm_k."),
    # diffusers calls the affine cross-attention norm `norm2`; Wan calls it `norm3` (its norm2 has no weights).
    ("blocks.{i}.norm2.", "blocks.{i}.norm3."),
    ("blocks.{i}.ffn.net.0.proj.", "blocks.{i}.ffn.0."),
    ("blocks.{i}.ffn.net.2.", "blocks.{i}.ffn.2."),
    ("blocks.{i}.scale_shift_table", "blocks.{i}.modulation"),
    ("proj_out.", "head.head."),
    ("scale_shift_table", "head.modulation"),
]
# Other tools wrap the original names in a prefix; stripping it keeps one original map.
_ORIGINAL_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")
_IMAGE_BRANCH = ("img_emb", "k_img", "v_img", "add_k_proj", "add_v_proj", "image_embedder")
# Heads cannot be read from shapes; the released sizes fill in when no config names them.
_KNOWN_HEADS = {1536: 12, 5120: 40}


def _compile(src: str, dst: str) -> tuple[re.Pattern, str]:
    pattern = re.escape(src).replace(re.escape("{i}"), r"(\d+)") + ("" if src.endswith(".") else "$")
    return re.compile(pattern), dst.replace("{i}", r"\1")


_TO_ORIGINAL = [_compile(d, o) for d, o in DIFFUSERS_TO_ORIGINAL]
_TO_DIFFUSERS = [_compile(o, d) for d, o in DIFFUSERS_TO_ORIGINAL]


def _rename(key: str, table: list[tuple[re.Pattern, str]]) -> str:
    for pattern, template in table:
        match = pattern.match(key)
        if match:
            return match.expand(template) + key[match.end() :]
    return key


def diffusers_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers WanTransformer3DModel state dict to Wan's original (= our) names."""
    return {_rename(k, _TO_ORIGINAL): v for k, v in state.items()}


def original_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse map: Wan original (= our) names -> diffusers names."""
    return {_rename(k, _TO_DIFFUSERS): v for k, v in state.items()}


def detect_layout(state: dict[str, torch.Tensor]) -> str:
    """'diffusers' or 'original', from the key names."""
    if any(k.startswith("condition_embedder.") for k in state):
        return "diffusers"
    if any(k.endswith("time_embedding.0.weight") for k in state):
        return "original"
    raise ValueError("state dict is neither the Wan original nor the diffusers WanTransformer3DModel layout")


def to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any supported layout -> our names; refuses the image-to-video branch."""
    image_keys = sorted(k for k in state if any(part in k for part in _IMAGE_BRANCH))
    if image_keys:
        raise ValueError(f"image-to-video weights are not supported (found {image_keys[:3]} ...)")
    if detect_layout(state) == "diffusers":
        return diffusers_to_original(state)
    for prefix in _ORIGINAL_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            return {k[len(prefix) :]: v for k, v in state.items()}
    return dict(state)


def config_from_state_dict(
    state: dict[str, torch.Tensor], *, num_heads: int | None = None, eps: float = 1e-6, text_len: int = 512
) -> DiTConfig:
    """Read a DiTConfig off an original-layout state dict's shapes (heads given or known)."""
    patch = state["patch_embedding.weight"]  # (D, C_in, pt, ph, pw)
    dim = patch.shape[0]
    if num_heads is None:
        if dim not in _KNOWN_HEADS:
            raise ValueError(f"dim={dim}: number of heads unknown; pass num_heads (CLI: --num-heads)")
        num_heads = _KNOWN_HEADS[dim]
    patch_size = tuple(patch.shape[2:])
    return DiTConfig(
        patch_size=patch_size,
        in_channels=patch.shape[1],
        out_channels=state["head.head.weight"].shape[0] // (patch_size[0] * patch_size[1] * patch_size[2]),
        dim=dim,
        ffn_dim=state["blocks.0.ffn.0.weight"].shape[0],
        freq_dim=state["time_embedding.0.weight"].shape[1],
        text_dim=state["text_embedding.0.weight"].shape[1],
        num_heads=num_heads,
        num_layers=len({k.split(".")[1] for k in state if k.startswith("blocks.")}),
        qk_norm="blocks.0.self_attn.norm_q.weight" in state,
        cross_attn_norm="blocks.0.norm3.weight" in state,
        eps=eps,
        text_len=text_len,
    )


def read_checkpoint(src: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors of a .safetensors file or of every .safetensors in a folder, plus its config.json (or {})."""
    from safetensors.torch import load_file

    src = Path(src)
    files = [src] if src.is_file() else sorted(src.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors file in {src}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(file))
    config_file = (src.parent if src.is_file() else src) / "config.json"
    return state, json.loads(config_file.read_text()) if config_file.exists() else {}


def load_wan(src: str | Path, *, num_heads: int | None = None, dtype: torch.dtype | None = None) -> DiT:
    """Build our DiT from a Wan 2.1 checkpoint in either layout."""
    raw, file_config = read_checkpoint(src)
    state = to_original(raw)
    heads = num_heads or file_config.get("num_heads") or file_config.get("num_attention_heads")
    cfg = config_from_state_dict(
        state, num_heads=heads, eps=file_config.get("eps", 1e-6), text_len=file_config.get("text_len", 512)
    )
    with torch.device("meta"):
        model = DiT(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to_compute_dtype(dtype) if dtype is not None else model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "src", help="Wan checkpoint folder or .safetensors file (original or diffusers layout)"
    )
    parser.add_argument("--out", required=True, help="output folder (model.safetensors + config.json)")
    parser.add_argument("--num-heads", type=int, default=None, help="heads, if no config.json names them")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None, help="cast the weights")
    args = parser.parse_args(argv)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, None: None}[args.dtype]
    model = load_wan(args.src, num_heads=args.num_heads, dtype=dtype)
    model.save_pretrained(args.out)
    print(f"wrote {args.out}: {model.num_params() / 1e6:.1f}M parameters, {model.cfg}")


if __name__ == "__main__":
    main()
