"""Continuous batching for a local causal LM: many replies generated together on the one model thread.

Each decoding step runs the model once for every sequence under way (one new token each), which on a CPU costs
little more than a step for one sequence: a small model's step is bound by reading the weights, not by the
arithmetic. Requests waiting are admitted between steps: each prompt is prefilled on its own (its first token
comes straight away), then its KV cache joins the batch's, left-padded to a common length, and the attention
mask hides the padding; prompts prefilled in the same tick join together, in one copy of the batch's cache. A
sequence leaves the batch when it ends (end of sequence, its token limit, or its consumer gone), and the padding
no row needs any more is cut off.

The caches keep their keys and values in buffers with room to grow (:class:`GrowingLayer`): a decoding step
writes its one new position in place. transformers' ``DynamicLayer`` concatenates instead, copying the whole
cache of every layer at every step, which cost a quarter of a 10-row step on the 2-core machine.

Prompts mostly begin the same way (the system prompt), and a session's next prompt begins with its last prompt and
the reply to it, so the KV caches of recent prompts, and of finished replies with their prompts, are kept (up to
a token budget, per adapter) and a new prompt is prefilled only from where it stops matching one of them: a
session's first token then costs its new message, not the whole conversation again.

Sequences with different LoRA adapters share a step through PEFT's mixed-adapter batches (``adapter_names``):
the base layers run once for the whole batch and each adapter's low-rank update only for its own rows.

The batcher never runs on its own thread: one :meth:`Batcher.tick` (admit what waits, one decoding step) is a
job on the device's model thread, and it queues the next tick behind whatever else was submitted meanwhile
(loading an adapter, another model's batch), so those wait one step, not a whole reply.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import (
    Cache,
    DynamicCache,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.cache_utils import DynamicLayer

from emili_chat.llm.base import BackendError

log = logging.getLogger(__name__)

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed-adapter batch.


class GrowingLayer(DynamicLayer):
    """A full-attention cache layer whose keys and values are views of buffers with ``headroom`` free positions:
    an update writes the new positions in place, and only a full buffer is copied into a bigger one.

    Code that replaces ``keys``/``values`` (the batcher joining rows, dropping them or cutting padding; transformers'
    ``batch_select_indices``) is noticed at the next update, which moves them into a new buffer: those are rare,
    decoding steps are not.
    """

    headroom = 64

    def __init__(self) -> None:
        super().__init__()
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None
        self._length = 0

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        if not self._owns_current() or self._length + new > self._capacity():
            self._move_to_new_buffers(key_states, value_states, new)
        assert self._key_buffer is not None and self._value_buffer is not None
        end = self._length + new
        self._key_buffer[..., self._length : end, :] = key_states
        self._value_buffer[..., self._length : end, :] = value_states
        self._length = end
        self.keys, self.values = self._key_buffer[..., :end, :], self._value_buffer[..., :end, :]
        return self.keys, self.values

    def _capacity(self) -> int:
        return 0 if self._key_buffer is None else self._key_buffer.shape[-2]

    def _owns_current(self) -> bool:
        """Whether ``keys`` and ``values`` are still this layer's views (nobody replaced them since the last update)."""
        if self._key_buffer is None or self.keys is None or self.values is None:
            return False
        return (
            self.keys.shape[-2] == self._length
            and self.keys.data_ptr() == self._key_buffer.data_ptr()
            and self.values.data_ptr() == self._value_buffer.data_ptr()  # type: ignore[union-attr]
            and self.keys.shape[0] == self._key_buffer.shape[0]
        )

    def _move_to_new_buffers(self, key_states: torch.Tensor, value_states: torch.Tensor, new: int) -> None:
        keys, values = self.keys, self.values
        length = 0 if keys is None or keys.dim() < 2 or keys.numel() == 0 else keys.shape[-2]
        batch, heads, _, size = key_states.shape
        shape = (batch, heads, length + new + self.headroom, size)
        self._key_buffer = key_states.new_empty(shape)
        self._value_buffer = value_states.new_empty((*shape[:-1], value_states.shape[-1]))
        if length:
            assert keys is not None and values is not None
            self._key_buffer[..., :length, :] = keys
            self._value_buffer[..., :length, :] = values
        self._length = length


def growing_cache() -> Cache:
    """An empty cache whose layers are :class:`GrowingLayer` (one added per layer at its first update)."""
    return Cache(layer_class_to_replicate=GrowingLayer)


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy (``temperature == 0``) or sampled, as ``generate`` would do it."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 50  # transformers' default when the model's generation_config sets none.
    repetition_penalty: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def processors(self) -> LogitsProcessorList:
        """The logits processors ``generate`` applies for these settings, in its order."""
        processors = LogitsProcessorList()
        if self.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if self.greedy:
            return processors
        if self.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k:
            processors.append(TopKLogitsWarper(self.top_k))
        if self.top_p < 1.0:
            processors.append(TopPLogitsWarper(self.top_p))
        return processors


@dataclass(eq=False)
class Request:
    """One reply to generate. ``emit`` gets each new token id (on the model thread); ``done`` completes when the
    sequence has left the batch for good, with the error if generation failed."""

    input_ids: torch.Tensor  # [1, prompt length]
    max_new_tokens: int
    adapter: str | None
    sampling: Sampling
    emit: Callable[[int], None]
    stop: threading.Event = field(default_factory=threading.Event)
    done: Future[None] = field(default_factory=Future)
    at_limit: bool = False  # Set when it ends: max_new_tokens reached before an end-of-sequence token.


@dataclass(eq=False)
class _Prefix:
    """A prompt's KV cache, kept so that a prompt that begins the same way need not be prefilled again."""

    adapter: str | None
    ids: torch.Tensor  # [length]
    keys: list[torch.Tensor]  # Per layer, [1, heads, length, head size]; never changed in place.
    values: list[torch.Tensor]

    def common_length(self, ids: torch.Tensor) -> int:
        n = min(len(self.ids), len(ids))
        same = self.ids[:n] == ids[:n]
        return n if bool(same.all()) else int(same.long().argmin())


@dataclass(eq=False)
class _Sequence:
    request: Request
    processors: LogitsProcessorList
    generator: torch.Generator | None
    ids: torch.Tensor  # Prompt and reply so far, [1, n]: what repetition penalty looks at.
    prompt_length: int
    generated: int = 0


class Batcher:
    """The sequences under way on one model and the requests waiting to join them.

    ``submit`` and ``withdraw`` may be called from any thread; everything else runs on the model thread.
    ``model`` is called for the model to use at each step (it changes when the first adapter is added).
    """

    def __init__(
        self,
        model: Callable[[], Any],
        executor: Executor,
        device: torch.device,
        eos_token_ids: set[int],
        max_batch: int = 16,
        prefix_cache_tokens: int = 4096,
    ) -> None:
        if max_batch < 1 or prefix_cache_tokens < 0:
            raise ValueError("max_batch must be at least 1, prefix_cache_tokens at least 0")
        self._model = model
        self._executor = executor
        self._device = device
        self._eos = eos_token_ids
        self.max_batch = max_batch
        self.prefix_cache_tokens = prefix_cache_tokens
        self._prefixes: list[_Prefix] = []  # Most recently used first.
        self._finishing: list[tuple[Request, BackendError | None]] = []  # Completed at the end of the tick.
        self.prefilled_tokens = 0  # Prompt tokens run through the model (the rest came from kept prefixes).
        self._lock = threading.Lock()  # Guards _waiting and _scheduled.
        self._waiting: list[Request] = []
        self._scheduled = False
        # The batch (model thread only): one row per sequence, the KV cache left-padded to a common length.
        self._rows: list[_Sequence] = []
        self._cache: Cache | None = None
        self._mask = torch.zeros(0, 0, dtype=torch.long, device=device)  # [rows, cache length]; 0 = padding.
        self._positions = torch.zeros(0, dtype=torch.long, device=device)  # Next position id of each row.
        self._last = torch.zeros(0, dtype=torch.long, device=device)  # Each row's newest token, not yet fed.
        self._mergeable: bool | None = None  # Whether caches can be padded and stacked (full attention only).
        self.largest_batch = 0  # The most sequences stepped together so far, for benchmarks and logs.
        self.decoding_steps = 0  # Steps so far, and the sequences they stepped (their mean is the mean batch).
        self.stepped_sequences = 0

    @property
    def active(self) -> int:
        """Sequences in the batch."""
        return len(self._rows)

    @property
    def waiting(self) -> int:
        """Requests not yet admitted."""
        with self._lock:
            return len(self._waiting)

    def submit(self, request: Request) -> None:
        with self._lock:
            self._waiting.append(request)
            if self._scheduled:
                return
            self._scheduled = True
        self._schedule()

    def withdraw(self, request: Request) -> bool:
        """Take back a request that has not started; False when it is already in the batch (or finished)."""
        with self._lock:
            if request not in self._waiting:
                return False
            self._waiting.remove(request)
        request.done.set_result(None)
        return True

    # --- on the model thread ----------------------------------------------------------------------------------

    def tick(self) -> None:
        """Admit waiting requests, run one decoding step, and queue the next tick while there is work."""
        try:
            self._drop_stopped()
            self._admit()
            if self._rows:
                self._step()
        except Exception as exc:
            error = exc if isinstance(exc, BackendError) else BackendError(f"local generation failed: {exc}")
            log.exception("batched generation failed; ending %d sequences", len(self._rows))
            self._settle_finished()
            self._fail_all(error)
        self._settle_finished()
        with self._lock:
            self._scheduled = bool(self._rows or self._waiting)
            if not self._scheduled:
                return
        self._schedule()

    def _schedule(self) -> None:
        try:
            self._executor.submit(self.tick)
        except RuntimeError as exc:  # The executor is shutting down (interpreter exit).
            with self._lock:
                self._scheduled = False
                waiting, self._waiting = self._waiting, []
            error = BackendError(f"the model thread is gone: {exc}")
            self._fail_all(error)
            for request in waiting:
                request.done.set_exception(error)

    def _admit(self) -> None:
        joining: list[tuple[_Sequence, Cache, int]] = []
        try:
            while True:
                capacity = self.max_batch if self._mergeable is not False else 1
                with self._lock:
                    if not self._waiting or len(self._rows) + len(joining) >= capacity:
                        return
                    request = self._waiting.pop(0)
                if request.stop.is_set():  # Its consumer left while it waited.
                    request.done.set_result(None)
                    continue
                try:
                    prefilled = self._prefill(request)
                except Exception as exc:
                    error = exc if isinstance(exc, BackendError) else BackendError(f"local generation failed: {exc}")
                    request.done.set_exception(error)
                    continue
                if prefilled is not None:
                    joining.append(prefilled)
        finally:
            if joining:
                self._join(joining)

    def _prefill(self, request: Request) -> tuple[_Sequence, Cache, int] | None:
        """Run the prompt past its kept prefix and choose its first token; the sequence, its cache and that token
        to join the batch, or None when it already ended."""
        sampling = request.sampling
        generator = None
        if sampling.seed is not None and not sampling.greedy:
            generator = torch.Generator(self._device).manual_seed(sampling.seed)
        input_ids = request.input_ids.to(self._device)
        length = input_ids.shape[1]
        sequence = _Sequence(request, sampling.processors(), generator, input_ids, length)
        cache, start = self._kept_prefix(request.adapter, input_ids[0])
        if cache is None:
            cache = self._new_cache()
        with torch.inference_mode():
            output = self._forward(
                input_ids=input_ids[:, start:],
                attention_mask=torch.ones_like(input_ids),
                position_ids=torch.arange(start, length, device=self._device).unsqueeze(0),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
                adapters=[request.adapter],
            )
        self.prefilled_tokens += length - start
        cache = output.past_key_values
        if self._mergeable:
            self._keep_prefix(request.adapter, input_ids[0], [_kv(layer) for layer in cache.layers])
        token = self._choose([sequence], output.logits[:, -1, :])[0]
        if self._advance(sequence, token):
            return None
        return sequence, cache, token

    def _new_cache(self) -> Cache:
        """A growing cache when every layer of the model attends to the whole context (the caches of such layers
        can be padded, stacked and kept), else the model's own kind of cache, and then one reply at a time."""
        if self._mergeable is None:
            layers = DynamicCache(config=self._model().config).layers
            self._mergeable = all(type(layer) is DynamicLayer for layer in layers)
            if not self._mergeable:
                log.warning("this model's KV cache cannot be batched or kept; replies are generated one at a time")
        return growing_cache() if self._mergeable else DynamicCache(config=self._model().config)

    def _kept_prefix(self, adapter: str | None, ids: torch.Tensor) -> tuple[Cache | None, int]:
        """A cache holding the longest kept beginning of ``ids`` (at most all but its last token, whose logits
        are needed), and that beginning's length; (None, 0) when nothing matches."""
        best, best_length = None, 0
        for prefix in self._prefixes:
            if prefix.adapter == adapter:
                common = min(prefix.common_length(ids), len(ids) - 1)
                if common > best_length:
                    best, best_length = prefix, common
        if best is None:
            return None, 0
        self._prefixes.remove(best)
        self._prefixes.insert(0, best)
        cache = growing_cache()
        for layer, (keys, values) in enumerate(zip(best.keys, best.values, strict=True)):
            cache.update(keys[:, :, :best_length], values[:, :, :best_length], layer)
        return cache, best_length

    def _keep_prefix(
        self, adapter: str | None, ids: torch.Tensor, layers: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> None:
        """Keep the keys and values (per layer, [1, heads, len(ids), head size]) of ``ids`` for later prompts."""
        if len(ids) > self.prefix_cache_tokens:
            return
        kept = _Prefix(adapter, ids, [keys for keys, _ in layers], [values for _, values in layers])
        # A kept prompt that this one begins with (the same session's last turn) is no longer needed.
        self._prefixes = [
            p for p in self._prefixes if not (p.adapter == adapter and p.common_length(ids) == len(p.ids))
        ]
        self._prefixes.insert(0, kept)
        total = 0
        for index, prefix in enumerate(self._prefixes):
            total += len(prefix.ids)
            if total > self.prefix_cache_tokens:
                del self._prefixes[index:]
                break

    def _join(self, joining: list[tuple[_Sequence, Cache, int]]) -> None:
        """Add newly prefilled sequences to the batch: their caches and the batch's, left-padded to a common
        length, stacked in one copy per layer."""
        # Each new cache holds its prompt and no reply token yet.
        lengths = [sequence.prompt_length for sequence, _, _ in joining]
        masks = [torch.ones(1, length, dtype=torch.long, device=self._device) for length in lengths]
        caches = [cache for _, cache, _ in joining]
        if self._cache is not None and self._rows:
            masks.insert(0, self._mask)
            caches.insert(0, self._cache)
        if len(caches) == 1:
            self._cache, self._mask = caches[0], masks[0]
        else:
            width = max(mask.shape[1] for mask in masks)
            for mine, *theirs in zip(caches[0].layers, *(cache.layers for cache in caches[1:]), strict=True):
                pairs = [_kv(mine), *(_kv(layer) for layer in theirs)]
                mine.keys = torch.cat([_pad_left(keys, width) for keys, _ in pairs])
                mine.values = torch.cat([_pad_left(values, width) for _, values in pairs])
            self._cache = caches[0]
            self._mask = torch.cat([_pad_left(mask, width) for mask in masks])
        self._rows += [sequence for sequence, _, _ in joining]
        self._positions = torch.cat([self._positions, self._positions.new_tensor(lengths)])
        self._last = torch.cat([self._last, self._last.new_tensor([token for _, _, token in joining])])

    def _step(self) -> None:
        self.largest_batch = max(self.largest_batch, len(self._rows))
        self.decoding_steps += 1
        self.stepped_sequences += len(self._rows)
        assert self._cache is not None
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(self._rows), 1)], dim=1)
        with torch.inference_mode():
            output = self._forward(
                input_ids=self._last.unsqueeze(1),
                attention_mask=self._mask,
                position_ids=self._positions.unsqueeze(1),
                past_key_values=self._cache,
                use_cache=True,
                logits_to_keep=1,
                adapters=[row.request.adapter for row in self._rows],
            )
        self._positions = self._positions + 1
        tokens = self._choose(self._rows, output.logits[:, -1, :])
        keep = [
            i for i, (row, token) in enumerate(zip(self._rows, tokens, strict=True)) if not self._advance(row, token)
        ]
        self._last = torch.tensor(tokens, dtype=torch.long, device=self._device)
        if len(keep) < len(self._rows):
            for index in sorted(set(range(len(self._rows))) - set(keep)):
                self._keep_reply(index)
            self._keep(keep)

    def _keep_reply(self, index: int) -> None:
        """Keep a finished row's prompt and reply: the session's next prompt begins with them."""
        row = self._rows[index]
        if not self._mergeable or row.request.stop.is_set():
            return
        # The cache holds every token but the last one chosen (never fed), right-aligned in the row.
        length = int(self._mask[index].sum())
        assert self._cache is not None
        layers = [
            (keys[index : index + 1, :, -length:, :].clone(), values[index : index + 1, :, -length:, :].clone())
            for keys, values in (_kv(layer) for layer in self._cache.layers)
        ]
        self._keep_prefix(row.request.adapter, row.ids[0, :length], layers)

    def _forward(self, adapters: list[str | None], **inputs: Any) -> Any:
        model = self._model()
        if isinstance(model, PeftModel):
            inputs["adapter_names"] = [adapter or BASE for adapter in adapters]
        return model(**inputs)

    def _choose(self, rows: list[_Sequence], logits: torch.Tensor) -> list[int]:
        """The next token of each row: the same processors and draw as ``generate``, row by row where needed."""
        logits = logits.float()
        tokens: list[int] = []
        greedy_plain = [i for i, row in enumerate(rows) if row.request.sampling.greedy and not row.processors]
        picked = logits[greedy_plain].argmax(dim=-1).tolist() if greedy_plain else []
        chosen = dict(zip(greedy_plain, picked, strict=True))
        for i, row in enumerate(rows):
            if i in chosen:
                tokens.append(chosen[i])
                continue
            scores = row.processors(row.ids, logits[i : i + 1])  # type: ignore[arg-type]  # ids are long.
            if row.request.sampling.greedy:
                tokens.append(int(scores.argmax(dim=-1)))
                continue
            probs = F.softmax(scores, dim=-1)
            tokens.append(int(torch.multinomial(probs, num_samples=1, generator=row.generator)))
        return tokens

    def _advance(self, row: _Sequence, token: int) -> bool:
        """Record and emit ``token``; True when the sequence is finished (and must leave the batch)."""
        request = row.request
        row.generated += 1
        row.ids = torch.cat([row.ids, row.ids.new_tensor([[token]])], dim=1)
        if token in self._eos:
            self._finishing.append((request, None))
            return True
        try:
            request.emit(token)
        except Exception as exc:  # Its consumer's event loop is gone: end this sequence only.
            self._finishing.append((request, BackendError(f"could not deliver a token: {exc}")))
            return True
        if row.generated >= request.max_new_tokens or request.stop.is_set():
            request.at_limit = row.generated >= request.max_new_tokens
            self._finishing.append((request, None))
            return True
        return False

    def _settle_finished(self) -> None:
        """Complete the requests that finished in this tick, now that they have left the batch."""
        finishing, self._finishing = self._finishing, []
        for request, error in finishing:
            if error is None:
                request.done.set_result(None)
            else:
                request.done.set_exception(error)

    def _drop_stopped(self) -> None:
        """Sequences whose consumer has gone leave before the next step, not after it."""
        keep = [i for i, row in enumerate(self._rows) if not row.request.stop.is_set()]
        if len(keep) < len(self._rows):
            self._finishing += [(row.request, None) for row in self._rows if row.request.stop.is_set()]
            self._keep(keep)

    def _keep(self, keep: list[int]) -> None:
        self._rows = [self._rows[i] for i in keep]
        if not self._rows:
            self._cache = None
            self._mask = self._mask[:0, :0]
            self._positions, self._last = self._positions[:0], self._last[:0]
            return
        index = torch.tensor(keep, dtype=torch.long, device=self._device)
        assert self._cache is not None
        self._cache.batch_select_indices(index)
        self._mask, self._positions, self._last = self._mask[index], self._positions[index], self._last[index]
        # Columns that are padding in every remaining row only cost time: cut them off.
        unused = int(self._mask.any(dim=0).long().argmax())
        if unused:
            for layer in self._cache.layers:
                keys, values = _kv(layer)
                layer.keys, layer.values = keys[..., unused:, :], values[..., unused:, :]  # type: ignore[union-attr]
            self._mask = self._mask[:, unused:]

    def _fail_all(self, error: BackendError) -> None:
        rows, self._rows, self._cache = self._rows, [], None
        self._mask = self._mask[:0, :0]
        self._positions, self._last = self._positions[:0], self._last[:0]
        for row in rows:
            if not row.request.done.done():
                row.request.done.set_exception(error)


def _kv(layer: object) -> tuple[torch.Tensor, torch.Tensor]:
    """A full-attention cache layer's keys and values (checked once per model: ``Batcher._mergeable``)."""
    assert isinstance(layer, DynamicLayer) and layer.keys is not None and layer.values is not None
    return layer.keys, layer.values


def _pad_left(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Zeros before the sequence axis (the second-to-last of a KV tensor, the last of a mask) up to ``width``."""
    missing = width - (tensor.shape[-2] if tensor.dim() == 4 else tensor.shape[-1])
    if missing <= 0:
        return tensor
    if tensor.dim() == 4:
        return F.pad(tensor, (0, 0, missing, 0))
    return F.pad(tensor, (missing, 0))
