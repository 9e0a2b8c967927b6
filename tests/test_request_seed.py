"""Seeds: any seed in [0, 2**63) is used exactly; one the engine draws is below 2**53, so a client that reads JSON
numbers as doubles (JavaScript) holds it exactly and "the same seed" draws the same images."""

from __future__ import annotations

from dit_runtime.engine import Engine, EngineConfig, GenerationRequest
from dit_runtime.request import MAX_DRAWN_SEED, MAX_SEED


def small_engine(checkpoint) -> Engine:
    return Engine.from_checkpoint(checkpoint, EngineConfig(max_batch_size=16))


def test_drawn_seeds_are_below_2_53_and_given_seeds_up_to_2_63_are_used_exactly(pixel_checkpoint):
    assert MAX_DRAWN_SEED == 2 ** 53 and float(MAX_DRAWN_SEED - 1) == MAX_DRAWN_SEED - 1  # a double holds them all
    engine = small_engine(pixel_checkpoint)
    drawn = engine.generate([GenerationRequest.of(c, num_inference_steps=1, guidance_scale=1.0) for c in range(8)])
    # A draw in [0, 2**63) lands below 2**53 once in 1024: eight of them all below it would not happen by chance.
    assert all(0 <= r.seed < 2 ** 53 for r in drawn), [r.seed for r in drawn]
    assert len({r.seed for r in drawn}) == 8
    given = [2 ** 62 + 1, MAX_SEED - 1]  # neither is a double
    results = engine.generate([GenerationRequest.of(0, num_inference_steps=1, guidance_scale=1.0, seed=s)
                               for s in given])
    assert [r.seed for r in results] == given
