"""bench.dit_loss --probe: the diffusion model as a classifier of the attribute words it reads."""

import random
import zlib

import torch

from bench.dit_loss import PROBE_SIGMAS, attribute_probe, probe_captions
from data.evaluate import ATTRIBUTES, parse_prompt
from data.synthetic import caption, sample_scene


def scene_captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [caption(sample_scene(rng, split="train"), rng) for _ in range(n)]


def test_probe_captions_change_only_the_probed_word():
    for text in scene_captions(40):
        named = parse_prompt(text)
        for attribute in ATTRIBUTES:
            if named[attribute] is None:
                continue
            candidates, captions = probe_captions(named, attribute)
            assert named[attribute] in candidates and len(set(captions)) == len(candidates)
            for value, candidate in zip(candidates, captions, strict=True):
                assert parse_prompt(candidate) == {**named, attribute: value}


class IdEncoder:
    """Stands in for a text encoder: a caption's hidden state is its index in `captions`."""

    def __init__(self):
        self.captions: list[str] = []

    def encode(self, captions):
        ids = []
        for text in captions:
            if text not in self.captions:
                self.captions.append(text)
            ids.append(self.captions.index(text))
        return torch.tensor(ids, dtype=torch.float32)[:, None, None], torch.ones(len(ids), 1, dtype=torch.bool)


def clean_latent(named: dict) -> torch.Tensor:
    """A fixed random (C, T', H', W') latent per attribute combination."""
    key = tuple(named[a] for a in (*ATTRIBUTES, "background"))
    return torch.randn(2, 2, 2, 2, generator=torch.Generator().manual_seed(zlib.crc32(repr(key).encode())))


def test_probe_finds_every_word_an_oracle_reads_and_chance_for_a_blind_model():
    texts = scene_captions(12, seed=1)
    latents = torch.stack([clean_latent(parse_prompt(text)) for text in texts])  # (N, C, T', H', W')
    encoder = IdEncoder()

    def oracle(x_t, t, hidden, mask):  # the exact velocity of the clip its caption describes
        x0 = torch.stack([clean_latent(parse_prompt(encoder.captions[int(i)])) for i in hidden[:, 0, 0]])
        return (x_t - x0) / (t / 1000).view(-1, 1, 1, 1, 1)

    scores = attribute_probe(oracle, latents, texts, encoder)
    named = [parse_prompt(text) for text in texts]
    for attribute in ATTRIBUTES:
        assert scores[attribute] == {"accuracy": 1.0, "clips": sum(n[attribute] is not None for n in named)}
    by_level = attribute_probe(oracle, latents, texts, encoder, by_level=True)  # each level alone, too
    for attribute in ATTRIBUTES:
        assert by_level[attribute]["by_sigma"] == {str(sigma): 1.0 for sigma in PROBE_SIGMAS}

    blind = attribute_probe(lambda x_t, *_: torch.zeros_like(x_t), latents, texts, encoder)
    for attribute in ATTRIBUTES:  # every caption ties: the first candidate wins
        first = probe_captions(named[0], attribute)[0][0]
        having = [n for n in named if n[attribute] is not None]
        assert blind[attribute]["accuracy"] == round(sum(n[attribute] == first for n in having) / len(having), 3)
