"""bench.vae's evaluator agreement: what a VAE's reconstructions lose of what data.evaluate reads."""

import dataclasses

from bench.vae import _evaluator_agreement
from data.evaluate import describe
from data.synthetic import Scene, render


def test_agreement_counts_misread_attributes_and_names_the_confusions():
    scene = Scene(colour="red", shape="cross", size="small", motion="left", background="gray", start_x=0.8,
                  start_y=0.5)
    clip = describe(render(scene, frames=9, size=64))
    as_circle = describe(render(dataclasses.replace(scene, shape="circle"), frames=9, size=64))
    still = describe(render(dataclasses.replace(scene, motion=None), frames=1, size=64))
    lines = _evaluator_agreement([(clip, clip), (clip, as_circle), (still, still)])
    header, _, cells = lines[3:6]
    assert header == "| colour | shape | size | motion | background |"
    # shape: 2 of 3 read the same; motion counts only the two clips (a still has none), both kept "left"
    assert cells == "| 100.0% of 3 | 66.7% of 3 | 100.0% of 3 | 100.0% of 2 | 100.0% of 3 |"
    assert lines[-1] == "Misread shapes: cross -> circle (1)"
