"""Text encoders: Hugging Face T5 / UMT5 / CLIP-text encoders behind one small class, plus an embedding cache.

    encoder = TextEncoder.from_pretrained("default")            # embedded, offline
    encoder = TextEncoder.from_pretrained("google/umt5-xxl", max_length=512, dtype=torch.bfloat16)  # Wan's
    hidden, mask = encoder.encode(["a red circle moving left"])  # (B, S, Dt) float32, (B, S) bool

Tokenisation is explicit: every prompt is padded to `max_length` (so S is fixed and batches, caches and
the DiT's text mask all line up) and truncated to it, with a warning naming the prompt. Hidden states
at padded positions are set to zero, as Wan does, and the mask marks them False.

The empty prompt "" is the unconditional input for classifier-free guidance. It encodes to the
tokeniser's special tokens alone: a single end-of-sequence token for T5/UMT5 and the default encoder
(mask: one True), start + end tokens for CLIP. It is an ordinary encoding, not a zero tensor, so the
DiT sees the same kind of input in both branches of guidance.

The embedded default (`dit/assets/text_encoder/`, "default") exists so the demo, the tests and CI work
with no download. It is an ordinary HF folder (config.json + model.safetensors + tokenizer.json) loaded
by the same code as any hub encoder:
  - tokenizer: a `tokenizers` WordLevel model over a fixed English vocabulary (the synthetic world's
    words, harvested from data/synthetic.py, plus common words), lower-cased, split on whitespace and
    punctuation, with <unk> for anything else and </s> appended (T5 convention: pad=0, eos=1).
  - model: a 2-layer `T5EncoderModel` (d_model 64, gated-GELU, relative position buckets) initialised
    from a fixed seed and never trained. A frozen random transformer still maps each word to a distinct
    embedding and mixes in relative position, so "red circle moving left" and "left circle moving red"
    differ; the DiT learns to read these features during the demo's training. A pretrained encoder would
    be better but needs a download of hundreds of MB; this one is ~0.5 MB.
Regenerate it deterministically with `python -m dit.text_encoder --build-default`.

The cache (`EmbeddingCache`) keys on (encoder name, max_length, prompt): an in-memory LRU, plus an
optional folder of one small safetensors file per prompt, so training captions are encoded once.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import re
import warnings
from collections import OrderedDict
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DEFAULT_PATH = Path(__file__).parent / "assets" / "text_encoder"
DEFAULT_SEED = 20240229
DEFAULT_MAX_LENGTH = 64
# T5's relative-position encoder has no position table; without a tokenizer limit use T5's own.
FALLBACK_MAX_LENGTH = 512
SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2: T5's pad and eos ids

# Common words beyond the synthetic world: enough for hand-written demo prompts and negative prompts.
COMMON_WORDS = """
a an the and or but not no with without of in on at to from by for over under above below behind near
into onto across through around between against along toward towards while then than as is are was be
being it its this that these those there here one two three four five many few some all every each
other another more most less very quite slowly quickly fast slow smoothly gently suddenly still again
left right up down upward downward leftward rightward forward backward top bottom middle center centre
side corner edge front back inside outside far close moving move moves sliding slide rising rise falling
fall drifting drift spinning spin rotating rotate bouncing bounce jumping jump rolling roll flying fly
walking walk running run swimming swim standing stand sitting sit floating float growing grow shrinking
shrink turning turn shaking shake waving wave motionless static resting rest stop stopped
small tiny little large big huge giant medium long short tall wide narrow thin thick round flat sharp soft
red green blue yellow cyan magenta orange purple pink brown black white gray grey golden silver dark
light bright pale colorful colourful transparent shiny
circle disc disk ball sphere square block cube box triangle cross plus sign star heart line dot shape
shapes object objects rectangle oval ring point arrow
background backdrop screen scene sky ground floor wall water sea ocean river lake beach sand grass field
forest tree trees flower flowers mountain hill road street city building house room window door table
sun moon cloud clouds rain snow fire smoke light shadow night day morning evening
person man woman child people dog cat bird fish horse car boat train plane robot
video clip image photo picture frame frames camera view shot close-up zoom pan still animation
high quality detailed realistic cinematic beautiful simple clean clear sharp blurry blurred noisy low
worst best bad good ugly deformed distorted artifacts watermark text logo static overexposed underexposed
""".split()


def pad_text(hidden: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad text states (B, S, Dt) and their mask (B, S) to S = length with masked zeros."""
    pad = length - hidden.shape[1]
    return (torch.nn.functional.pad(hidden, (0, 0, 0, pad)),  # (B, length, Dt)
            torch.nn.functional.pad(mask, (0, pad), value=False))  # (B, length)


# ----------------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------------
class EmbeddingCache:
    """(encoder name, max_length, prompt) -> (hidden (S, Dt) float32, mask (S,) bool) on the CPU.

    In memory: an LRU of `capacity` prompts. On disk (when `folder` is set): one safetensors file per
    prompt holding only its unpadded tokens, named by a hash of the key, shared across runs.
    """

    def __init__(self, capacity: int = 4096, folder: str | Path | None = None):
        if capacity < 0:
            raise ValueError(f"capacity={capacity}: must be >= 0")
        self.capacity = capacity
        self.folder = Path(folder) if folder is not None else None
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
        self._memory: OrderedDict[tuple[str, int, str], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def _file(self, key: tuple[str, int, str]) -> Path:
        digest = hashlib.sha256(repr(key).encode()).hexdigest()[:32]
        return self.folder / f"{digest}.safetensors"

    def get(self, key: tuple[str, int, str]) -> tuple[torch.Tensor, torch.Tensor] | None:
        if key in self._memory:
            self._memory.move_to_end(key)
            self.hits += 1
            return self._memory[key]
        if self.folder is not None and self._file(key).exists():
            from safetensors.torch import load_file

            stored = load_file(self._file(key))
            length = int(stored["length"])
            hidden = torch.zeros(key[1], stored["tokens"].shape[1])  # (S, Dt)
            hidden[:length] = stored["tokens"]
            mask = torch.arange(key[1]) < length  # (S,): right padding, so the mask is a prefix
            self._remember(key, (hidden, mask))
            self.hits += 1
            return hidden, mask
        self.misses += 1
        return None

    def put(self, key: tuple[str, int, str], hidden: torch.Tensor, mask: torch.Tensor) -> None:
        hidden, mask = hidden.detach().float().cpu(), mask.cpu()
        self._remember(key, (hidden, mask))
        if self.folder is not None:
            from safetensors.torch import save_file

            length = int(mask.sum())
            save_file(
                {"tokens": hidden[:length].contiguous(), "length": torch.tensor(length)}, self._file(key)
            )

    def _remember(self, key, value) -> None:
        if self.capacity == 0:
            return
        self._memory[key] = value
        self._memory.move_to_end(key)
        while len(self._memory) > self.capacity:
            self._memory.popitem(last=False)

    def __len__(self) -> int:
        return len(self._memory)


# ----------------------------------------------------------------------------------------------------
# Encoder
# ----------------------------------------------------------------------------------------------------
def _model_class(model_type: str):
    import transformers

    classes = {
        "t5": transformers.T5EncoderModel,
        "umt5": transformers.UMT5EncoderModel,
        "clip": transformers.CLIPTextModel,
        "clip_text_model": transformers.CLIPTextModel,
    }
    if model_type not in classes:
        raise ValueError(f"text encoder model_type={model_type!r}: supported are {sorted(classes)}")
    return classes[model_type]


class TextEncoder:
    """A frozen HF text encoder and its tokenizer: prompts -> (hidden (B, S, Dt) float32, mask (B, S) bool)."""

    def __init__(self, model, tokenizer, *, name: str, max_length: int, cache: EmbeddingCache | None = None):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.max_length = max_length
        self.cache = cache if cache is not None else EmbeddingCache()

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str = "default",
        *,
        max_length: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        cache: EmbeddingCache | None = None,
    ) -> TextEncoder:
        """Load from "default" (embedded), a local folder or a hub id (T5, UMT5 or CLIP text)."""
        from transformers import AutoConfig, AutoTokenizer

        source = str(DEFAULT_PATH) if name_or_path == "default" else name_or_path
        config = AutoConfig.from_pretrained(source)
        model = _model_class(config.model_type).from_pretrained(source, dtype=dtype or torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(source)
        if max_length is None:
            limit = tokenizer.model_max_length
            max_length = limit if limit < 100_000 else FALLBACK_MAX_LENGTH  # HF marks "no limit" with 1e30
        positions = getattr(model.config, "max_position_embeddings", None)
        if positions is not None and max_length > positions:
            raise ValueError(f"max_length={max_length}: must be <= the encoder's {positions} positions")
        if max_length < 1:
            raise ValueError(f"max_length={max_length}: must be >= 1")
        encoder = cls(model, tokenizer, name=name_or_path, max_length=max_length, cache=cache)
        return encoder.to(device) if device is not None else encoder

    @property
    def dim(self) -> int:
        config = self.model.config
        return config.d_model if hasattr(config, "d_model") else config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> TextEncoder:
        self.model.to(device)
        return self

    def _warn_truncation(self, prompts: list[str]) -> None:
        lengths = [len(ids) for ids in self.tokenizer(prompts, truncation=False)["input_ids"]]
        for prompt, length in zip(prompts, lengths, strict=True):
            if length > self.max_length:
                warnings.warn(
                    f"prompt truncated from {length} to {self.max_length} tokens: {prompt[:60]!r}...",
                    stacklevel=3,
                )

    @torch.no_grad()
    def _encode_uncached(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        self._warn_truncation(prompts)
        batch = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        ids = batch["input_ids"].to(self.device)  # (B, S)
        mask = batch["attention_mask"].to(self.device).bool()  # (B, S)
        hidden = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state.float()  # (B, S, Dt)
        return hidden * mask[..., None], mask  # padded positions are exact zeros

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> hidden (B, S=max_length, Dt) float32 and mask (B, S) bool, on the encoder's device."""
        if isinstance(prompts, str):
            raise TypeError("encode takes a list of prompts, not one string")
        keys = [(self.name, self.max_length, prompt) for prompt in prompts]
        found = {key: self.cache.get(key) for key in dict.fromkeys(keys)}
        missing = [key for key, value in found.items() if value is None]
        if missing:
            hidden, mask = self._encode_uncached([key[2] for key in missing])
            for i, key in enumerate(missing):
                self.cache.put(key, hidden[i], mask[i])
                found[key] = (hidden[i].cpu(), mask[i].cpu())
        hidden = torch.stack([found[key][0] for key in keys]).to(self.device)  # (B, S, Dt)
        mask = torch.stack([found[key][1] for key in keys]).to(self.device)  # (B, S)
        return hidden, mask


# ----------------------------------------------------------------------------------------------------
# The embedded default
# ----------------------------------------------------------------------------------------------------
def default_vocabulary() -> list[str]:
    """Special tokens, then the synthetic world's words, then common words; sorted, so the ids are stable."""
    from data import synthetic

    texts = [
        *synthetic.COLOURS,
        *synthetic.BACKGROUNDS,
        *synthetic.SHAPES,
        *synthetic.SIZES,
        *synthetic.MOTIONS,
    ]
    for table in (
        synthetic.SHAPE_WORDS,
        synthetic.SIZE_WORDS,
        synthetic.MOTION_PHRASES,
        synthetic.BACKGROUND_WORDS,
    ):
        texts += [phrase for phrases in table.values() for phrase in phrases]
    texts += [
        re.sub(r"\{\w+\}", " ", template)
        for template in (*synthetic.CLIP_TEMPLATES, *synthetic.IMAGE_TEMPLATES)
    ]
    words = {word for text in texts for word in re.findall(r"\w+|[^\w\s]", text.lower())}
    words |= set(COMMON_WORDS) | set(".,;:!?'-\"()")
    return [*SPECIAL_TOKENS, *sorted(words - set(SPECIAL_TOKENS))]


def build_default(folder: str | Path = DEFAULT_PATH, *, seed: int = DEFAULT_SEED) -> Path:
    """Write the embedded encoder (tokenizer + seeded random 2-layer T5 encoder) to `folder`, deterministically."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    folder = Path(folder)
    vocab = {word: i for i, word in enumerate(default_vocabulary())}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=DEFAULT_MAX_LENGTH,
    )

    config = T5Config(
        vocab_size=len(vocab),
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=16,
        relative_attention_max_distance=64,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    torch.manual_seed(seed)
    model = T5EncoderModel(config).eval()

    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    fast.save_pretrained(folder)
    # Name the generic fast class so transformers 4.x loads the folder too (5.x writes its own class name).
    config_file = folder / "tokenizer_config.json"
    import json

    tokenizer_config = json.loads(config_file.read_text())
    tokenizer_config.pop("backend", None)
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(tokenizer_config, indent=2, sort_keys=True) + "\n")
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Text encoder tools.")
    parser.add_argument("--build-default", action="store_true", help=f"regenerate {DEFAULT_PATH}")
    parser.add_argument("--out", default=str(DEFAULT_PATH), help="folder for --build-default")
    parser.add_argument("--encode", nargs="*", default=None, help="encode these prompts and print shapes")
    args = parser.parse_args(argv)
    if args.build_default:
        folder = build_default(args.out)
        size = sum(f.stat().st_size for f in folder.iterdir())
        print(f"wrote {folder} ({size / 1e3:.0f} KB)")
    if args.encode is not None:
        hidden, mask = TextEncoder.from_pretrained(args.out).encode(args.encode)
        print(f"hidden {tuple(hidden.shape)}, tokens per prompt {mask.sum(1).tolist()}")


if __name__ == "__main__":
    main()
