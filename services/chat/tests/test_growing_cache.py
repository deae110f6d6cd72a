"""The batcher's KV cache layer: what transformers' concatenating layer would hold, without copying every step."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from emili_chat.llm.batching import GrowingLayer


def states(batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(batch, 3, length, 8), torch.randn(batch, 3, length, 8)


def test_holds_what_concatenation_holds_and_writes_steps_in_place() -> None:
    growing, reference = GrowingLayer(), DynamicLayer()
    prompt = states(2, 5)
    growing.update(*prompt)
    reference.update(*prompt)
    buffer = growing.keys.data_ptr()
    for _ in range(GrowingLayer.headroom):
        step = states(2, 1)
        keys, values = growing.update(*step)
        expected_keys, expected_values = reference.update(*step)
        assert torch.equal(keys, expected_keys) and torch.equal(values, expected_values)
        assert keys.data_ptr() == buffer  # No copy while there is room.
    keys, _ = growing.update(*states(2, 1))  # Full: moved to a bigger buffer, content kept.
    assert keys.data_ptr() != buffer and keys.shape == (2, 3, 5 + GrowingLayer.headroom + 1, 8)
    assert torch.equal(keys[..., :-1, :], reference.keys)


def test_keys_replaced_from_outside_are_taken_over_at_the_next_update() -> None:
    layer = GrowingLayer()
    layer.update(*states(3, 4))
    layer.batch_select_indices(torch.tensor([0, 2]))  # As the batcher does when a sequence leaves.
    kept_keys = layer.keys.clone()
    layer.keys, layer.values = layer.keys[..., 1:, :], layer.values[..., 1:, :]  # Padding cut off.
    step = states(2, 1)
    keys, values = layer.update(*step)
    assert keys.shape == (2, 3, 4, 8)
    assert torch.equal(keys[..., :3, :], kept_keys[..., 1:, :]) and torch.equal(keys[..., 3:, :], step[0])
    assert torch.equal(values[..., 3:, :], step[1])
