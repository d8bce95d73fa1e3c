"""Text encoders: the embedded default, T5 / UMT5 / CLIP through one loader, masks, truncation, the cache."""

import json
import random
import shutil

import pytest
import torch

from dit.text_encoder import DEFAULT_PATH, EmbeddingCache, TextEncoder, build_default


@pytest.fixture(scope="module")
def default():
    return TextEncoder.from_pretrained("default")


def test_default_and_its_folder_load_the_same_encoder(default):
    by_path = TextEncoder.from_pretrained(str(DEFAULT_PATH))
    prompts = ["a small red circle moving left on a black background", ""]
    for a, b in zip(default.encode(prompts), by_path.encode(prompts), strict=True):
        assert torch.equal(a, b)
    assert (default.dim, default.max_length, default.name) == (64, 64, "default")


def test_build_default_regenerates_the_committed_files(tmp_path):
    build_default(tmp_path / "te")
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "te" / name).read_bytes() == (DEFAULT_PATH / name).read_bytes(), name
    # config.json records the transformers release that wrote it; everything else must match.
    built, committed = (json.loads((folder / "config.json").read_text()) for folder in (tmp_path / "te", DEFAULT_PATH))
    built.pop("transformers_version"), committed.pop("transformers_version")
    assert built == committed
    assert sum(f.stat().st_size for f in DEFAULT_PATH.iterdir()) < 3_000_000


def test_synthetic_world_captions_have_no_unknown_words(default):
    from data import synthetic

    rng = random.Random(0)
    unk = default.tokenizer.convert_tokens_to_ids("<unk>")
    for i in range(300):
        still = i % 5 == 0
        scene = synthetic.sample_scene(rng, split="train" if still or i % 2 else "heldout", still=still)
        ids = default.tokenizer(synthetic.caption(scene, rng))["input_ids"]
        assert unk not in ids


def test_mask_padding_and_the_empty_prompt(default):
    hidden, mask = default.encode(["a red circle", "", "zzzz qqqq"])
    assert hidden.dtype == torch.float32 and mask.dtype == torch.bool
    assert mask.sum(dim=1).tolist() == [4, 1, 3]  # words + </s>; the empty prompt is </s> alone
    assert torch.count_nonzero(hidden[~mask]) == 0  # padded positions are zeros
    assert hidden[1, 0].norm() > 0  # the unconditional input is a real encoding


def test_features_are_word_and_position_aware(default):
    hidden, _ = default.encode(
        ["red circle moving left", "left circle moving red", "blue circle moving left"]
    )
    assert not torch.allclose(hidden[0], hidden[1], atol=1e-3)  # same words, other order
    assert not torch.allclose(hidden[0, 0], hidden[2, 0], atol=1e-3)  # other word
    # batch padding does not leak: encoding alone equals encoding in a batch
    alone, _ = TextEncoder.from_pretrained("default").encode(["blue circle moving left"])
    torch.testing.assert_close(alone[0], hidden[2], rtol=1e-5, atol=1e-6)


def test_truncation_warns_and_keeps_max_length(default):
    encoder = TextEncoder.from_pretrained("default", max_length=8)
    with pytest.warns(UserWarning, match="truncated from 12 to 8"):
        hidden, mask = encoder.encode(["a small red circle moving left on a black background today"])
    assert hidden.shape == (1, 8, 64) and mask.all()


def _tiny_folder(tmp_path, kind: str):
    import transformers

    folder = tmp_path / kind
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEFAULT_PATH / name, folder / name)
    torch.manual_seed(0)
    vocab = 400
    if kind == "t5":
        model = transformers.T5EncoderModel(
            transformers.T5Config(
                vocab_size=vocab, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, dropout_rate=0.0
            )
        )
    elif kind == "umt5":
        model = transformers.UMT5EncoderModel(
            transformers.UMT5Config(
                vocab_size=vocab, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, dropout_rate=0.0
            )
        )
    else:
        model = transformers.CLIPTextModel(
            transformers.CLIPTextConfig(
                vocab_size=vocab,
                hidden_size=32,
                intermediate_size=48,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=64,
                pad_token_id=0,
                bos_token_id=1,
                eos_token_id=1,
            )
        )
    model.save_pretrained(folder)
    return folder, model.eval()


@pytest.mark.parametrize("kind", ["t5", "umt5", "clip"])
def test_hf_encoders_load_through_the_same_path_and_match_direct_calls(tmp_path, kind):
    folder, reference = _tiny_folder(tmp_path, kind)
    encoder = TextEncoder.from_pretrained(str(folder), max_length=16)
    assert encoder.dim == 32
    prompts = ["a big green square rising up", "a cat"]
    hidden, mask = encoder.encode(prompts)
    batch = encoder.tokenizer(prompts, padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        expected = reference(**batch).last_hidden_state
    torch.testing.assert_close(hidden[mask], expected[mask], rtol=1e-5, atol=1e-5)


def test_clip_max_length_beyond_its_positions_is_an_error(tmp_path):
    folder, _ = _tiny_folder(tmp_path, "clip")
    with pytest.raises(ValueError, match="max_length=100"):
        TextEncoder.from_pretrained(str(folder), max_length=100)


def test_cache_encodes_each_prompt_once_and_survives_on_disk(tmp_path, monkeypatch):
    encoder = TextEncoder.from_pretrained("default", cache=EmbeddingCache(folder=tmp_path / "cache"))
    first = encoder.encode(["a red circle", "a blue square", "a red circle"])
    assert (encoder.cache.misses, len(encoder.cache)) == (2, 2)
    encoder.encode(["a blue square"])
    assert encoder.cache.hits == 1

    fresh = TextEncoder.from_pretrained("default", cache=EmbeddingCache(folder=tmp_path / "cache"))

    def no_model_calls(*args, **kwargs):
        raise AssertionError("the disk cache should have answered")

    monkeypatch.setattr(fresh.model, "forward", no_model_calls)
    again = fresh.encode(["a red circle", "a blue square", "a red circle"])
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)


def test_lru_evicts_the_least_recently_used():
    cache = EmbeddingCache(capacity=2)
    value = (torch.zeros(3, 2), torch.ones(3, dtype=torch.bool))
    for prompt in ("a", "b"):
        cache.put(("enc", 3, prompt), *value)
    cache.get(("enc", 3, "a"))
    cache.put(("enc", 3, "c"), *value)
    assert cache.get(("enc", 3, "b")) is None and cache.get(("enc", 3, "a")) is not None
