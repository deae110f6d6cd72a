"""LocalHFBackend on a tiny random Llama (streaming, limits, cancellation, LoRA adapters) and on the real SmolLM2."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from emili_chat.llm import (
    BackendError,
    GenerationParams,
    LocalHFBackend,
    Message,
    ReplyEnd,
    build_backend,
    fold_system_messages,
)
from emili_chat.llm.batching import Request, Sampling
from emili_testing.plugin import tiny_llama

ARTIFACTS = Path(__file__).resolve().parents[3] / "var" / "artifacts" / "chat"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
needs_gguf = pytest.mark.skipif(not (ARTIFACTS / GGUF).is_file(), reason=f"{GGUF} is not in {ARTIFACTS}")
pytestmark = needs_gguf

CONVERSATION = [
    Message("system", "You are EMILI, a warm and empathetic chat partner."),
    Message("user", "Hi! I had a long day."),
    Message("assistant", "Oh no, what happened?"),
    Message("system", "Right now, user looks HAPPY (46)"),
    Message("user", "It ended well, I got a promotion!"),
]
GREEDY = GenerationParams(temperature=0.0, max_new_tokens=12)

# Says so when roles do not alternate or a system message is not first, as many real templates do.
STRICT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' and not loop.first %}{{ raise_exception('system only first') }}{% endif %}"
    "{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]['role'] %}"
    "{{ raise_exception('roles must alternate') }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    """SmolLM2's real tokenizer (with its chat template), read from the GGUF file; no Hub access."""
    return AutoTokenizer.from_pretrained(ARTIFACTS, gguf_file=GGUF, local_files_only=True)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: PreTrainedTokenizerBase) -> Path:
    """A random 2-layer Llama with hidden size 32, saved with the tokenizer as a model folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_adapter(base_dir: Path, folder: Path, seed: int) -> Path:
    """A LoRA adapter (r=4 on q_proj and v_proj) whose B matrices are random, so that it changes the output."""
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
    peft_model.save_pretrained(str(folder))
    assert (folder / "adapter_config.json").is_file()
    assert (folder / "adapter_model.safetensors").is_file()
    return folder


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> dict[str, Path]:
    # Not "a" or "b": PEFT warns about adapter names that are part of its "lora_" prefix.
    return {
        name: make_adapter(tiny_dir, tmp_path_factory.mktemp(name), seed) for name, seed in (("calm", 1), ("warm", 2))
    }


@pytest.fixture
async def backend(tiny_dir: Path) -> AsyncIterator[LocalHFBackend]:
    backend = LocalHFBackend(tiny_dir, context_window=4096)
    await backend.load()
    yield backend
    await backend.aclose()


def reference(model_dir: Path, messages: Sequence[Message], max_new_tokens: int, adapter: Path | None = None) -> str:
    """Plain, non-streamed greedy ``generate`` and decode, straight from transformers (and PEFT)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    conversation = [{"role": m.role, "content": m.content} for m in messages]
    inputs: Any = tokenizer.apply_chat_template(
        conversation, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    assert len(new_tokens) == max_new_tokens  # No early end of sequence: the limit is what stops it.
    return str(tokenizer.decode(new_tokens, skip_special_tokens=True))


async def collect(
    backend: LocalHFBackend,
    params: GenerationParams = GREEDY,
    adapter: str | None = None,
    messages: Sequence[Message] = CONVERSATION,
) -> list[str]:
    return [delta async for delta in backend.stream(messages, params, adapter)]


class ForwardCounter:
    """Counts forward passes of the model (one per generated token) and the most that ran at once."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls = 0
        self.running = 0
        self.most_at_once = 0
        model.register_forward_pre_hook(self._pre)
        model.register_forward_hook(self._post)

    def _pre(self, *_: object) -> None:
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        time.sleep(0.001)  # Widens the window in which an overlapping generation would be caught.

    def _post(self, *_: object) -> None:
        self.running -= 1
        self.calls += 1


async def test_stream_equals_non_streamed_greedy_decode(backend: LocalHFBackend, tiny_dir: Path) -> None:
    deltas = await collect(backend, GenerationParams(temperature=0.0, max_new_tokens=40))
    assert len(deltas) > 1 and all(deltas)
    assert "".join(deltas) == reference(tiny_dir, CONVERSATION, 40)


async def test_max_new_tokens_is_respected(backend: LocalHFBackend, tiny_dir: Path) -> None:
    counter = ForwardCounter(backend.model)
    text = "".join(await collect(backend, GenerationParams(temperature=0.0, max_new_tokens=5)))
    assert counter.calls == 5
    assert text == reference(tiny_dir, CONVERSATION, 5)


async def test_a_reply_stopped_by_max_new_tokens_is_reported_as_cut_off(backend: LocalHFBackend) -> None:
    end = ReplyEnd()
    deltas = [
        d async for d in backend.stream(CONVERSATION, GenerationParams(temperature=0.0, max_new_tokens=5), end=end)
    ]
    assert deltas and end.at_limit is True  # The tiny random model never ends a reply itself this soon.
    closed = ReplyEnd()
    stream = backend.stream(CONVERSATION, GenerationParams(temperature=0.0, max_new_tokens=800), end=closed)
    assert await anext(stream)
    await stream.aclose()  # type: ignore[attr-defined]
    assert closed.at_limit is None  # Left by its consumer: how it would have ended is not known.


async def test_seed_makes_sampling_reproducible(backend: LocalHFBackend) -> None:
    params = GenerationParams(temperature=1.0, max_new_tokens=20, seed=7)
    first, again = await collect(backend, params), await collect(backend, params)
    other = await collect(backend, GenerationParams(temperature=1.0, max_new_tokens=20, seed=8))
    assert "".join(first) == "".join(again) != "".join(other)


async def test_closing_the_stream_stops_generation(backend: LocalHFBackend) -> None:
    counter = ForwardCounter(backend.model)
    stream = backend.stream(CONVERSATION, GenerationParams(temperature=0.0, max_new_tokens=800))
    assert await anext(stream)
    await stream.aclose()  # type: ignore[attr-defined]
    stopped_at = counter.calls
    await asyncio.sleep(0.2)
    assert counter.calls == stopped_at < 100  # It had stopped by the time aclose returned.
    assert await collect(backend)  # And the model is free for the next generation.


async def test_cancelling_the_consumer_stops_generation(backend: LocalHFBackend) -> None:
    counter = ForwardCounter(backend.model)
    started = asyncio.Event()

    async def consume() -> None:
        async for _ in backend.stream(CONVERSATION, GenerationParams(temperature=0.0, max_new_tokens=800)):
            started.set()

    task = asyncio.create_task(consume())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    stopped_at = counter.calls
    await asyncio.sleep(0.2)
    assert counter.calls == stopped_at < 100


async def test_one_forward_pass_at_a_time(backend: LocalHFBackend) -> None:
    alone = await collect(backend)
    counter = ForwardCounter(backend.model)
    together = await asyncio.gather(*(collect(backend) for _ in range(3)))
    assert counter.most_at_once == 1
    assert all(result == alone for result in together)


# --- several sessions at once (continuous batching) ------------------------------------------------------------

# Prompts of different lengths, so that batched KV caches are padded, and different reply limits, so that
# sequences leave the batch at different steps while others go on.
SESSIONS = [
    (CONVERSATION, 12),
    ([Message("user", "Hello there.")], 30),
    ([Message("system", "Be brief."), Message("user", "What should I cook tonight? Something warm, please.")], 20),
    (CONVERSATION[:2], 25),
]


@contextlib.contextmanager
def model_thread_held(backend: LocalHFBackend) -> Iterator[threading.Event]:
    """Keeps the model thread busy until the event is set (or the block ends), so that requests made meanwhile
    all wait and then join the batch together."""
    release = threading.Event()
    backend._executor.submit(release.wait)
    try:
        yield release
    finally:
        release.set()


async def until_waiting(backend: LocalHFBackend, count: int) -> None:
    while backend.batcher.waiting < count:  # noqa: ASYNC110 - requests are counted by the batcher, no event.
        await asyncio.sleep(0.001)


async def test_concurrent_streams_give_the_text_each_gives_alone(backend: LocalHFBackend) -> None:
    alone = [
        "".join(await collect(backend, GenerationParams(temperature=0.0, max_new_tokens=n), messages=m))
        for m, n in SESSIONS
    ]
    counter = ForwardCounter(backend.model)
    with model_thread_held(backend) as release:
        streams = [
            asyncio.create_task(collect(backend, GenerationParams(temperature=0.0, max_new_tokens=n), messages=m))
            for m, n in SESSIONS
        ]
        await until_waiting(backend, len(SESSIONS))
        release.set()
        together = ["".join(deltas) for deltas in await asyncio.gather(*streams)]
    assert together == alone
    assert backend.batcher.largest_batch == len(SESSIONS)
    # One prefill each, then one step for all: the longest reply's steps, not the sum of all replies'.
    limits = [n for _, n in SESSIONS]
    assert counter.calls == len(SESSIONS) + max(limits) - 1 < sum(limits)
    assert backend.batcher.active == 0


async def test_seeded_sampling_in_a_batch_is_as_alone(backend: LocalHFBackend) -> None:
    params = [GenerationParams(temperature=1.0, max_new_tokens=15, seed=seed) for seed in (1, 2, 3)]
    alone = ["".join(await collect(backend, p)) for p in params]
    assert len(set(alone)) == 3
    with model_thread_held(backend) as release:
        streams = [asyncio.create_task(collect(backend, p)) for p in params]
        await until_waiting(backend, len(params))
        release.set()
        together = ["".join(deltas) for deltas in await asyncio.gather(*streams)]
    assert together == alone


async def test_a_cancelled_stream_leaves_the_others_undisturbed(backend: LocalHFBackend) -> None:
    long = GenerationParams(temperature=0.0, max_new_tokens=30)
    alone = "".join(await collect(backend, long))
    cancelled_deltas: list[str] = []

    async def cancelled() -> None:
        stream = backend.stream(CONVERSATION, GenerationParams(temperature=0.0, max_new_tokens=800))
        while len(cancelled_deltas) < 3:
            cancelled_deltas.append(await anext(stream))
        await stream.aclose()  # type: ignore[attr-defined]

    with model_thread_held(backend) as release:
        others = [asyncio.create_task(collect(backend, long)) for _ in range(2)]
        leaver = asyncio.create_task(cancelled())
        await until_waiting(backend, 3)
        release.set()
        await leaver
        assert len(cancelled_deltas) == 3
        together = ["".join(deltas) for deltas in await asyncio.gather(*others)]
    assert together == [alone, alone]
    assert backend.batcher.active == 0


async def test_a_stream_closed_while_waiting_never_runs(backend: LocalHFBackend) -> None:
    counter = ForwardCounter(backend.model)
    with model_thread_held(backend):
        stream = backend.stream(CONVERSATION, GREEDY)
        first = asyncio.create_task(anext(stream))
        await until_waiting(backend, 1)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert backend.batcher.waiting == 0
    assert await collect(backend)
    assert counter.calls == GREEDY.max_new_tokens  # Only the second stream's passes.


@pytest.mark.filterwarnings("error::UserWarning")
async def test_adapters_in_one_batch_each_give_their_own_output(
    backend: LocalHFBackend, tiny_dir: Path, adapter_dirs: dict[str, Path]
) -> None:
    await backend.add_adapter("calm", adapter_dirs["calm"])
    await backend.add_adapter("warm", adapter_dirs["warm"])
    arms: list[str | None] = [None, "calm", "warm", "calm", None]
    alone = {arm: "".join(await collect(backend, adapter=arm)) for arm in set(arms)}
    assert len(set(alone.values())) == 3
    assert alone["warm"] == reference(tiny_dir, CONVERSATION, GREEDY.max_new_tokens, adapter_dirs["warm"])
    with model_thread_held(backend) as release:
        streams = [asyncio.create_task(collect(backend, adapter=arm)) for arm in arms]
        await until_waiting(backend, len(arms))
        release.set()
        together = ["".join(deltas) for deltas in await asyncio.gather(*streams)]
    assert together == [alone[arm] for arm in arms]
    assert backend.batcher.largest_batch == len(arms)


async def test_adapters_on_packed_weights_in_one_batch_each_give_their_own_output(
    tiny_dir: Path, adapter_dirs: dict[str, Path]
) -> None:
    backend = LocalHFBackend(tiny_dir, context_window=4096, weights="float16")
    await backend.load()
    assert backend.load_info is not None and backend.load_info.packed_layers == 2 * 7 + 1
    await backend.add_adapter("calm", adapter_dirs["calm"])
    await backend.add_adapter("warm", adapter_dirs["warm"])
    arms: list[str | None] = [None, "calm", "warm", "calm"]
    alone = {arm: "".join(await collect(backend, adapter=arm)) for arm in set(arms)}
    assert len(set(alone.values())) == 3
    with model_thread_held(backend) as release:
        streams = [asyncio.create_task(collect(backend, adapter=arm)) for arm in arms]
        await until_waiting(backend, len(arms))
        release.set()
        together = ["".join(deltas) for deltas in await asyncio.gather(*streams)]
    assert together == [alone[arm] for arm in arms]
    await backend.aclose()


async def test_kept_prompts_save_prefill_and_change_nothing(tiny_dir: Path) -> None:
    first_turn, next_turn = CONVERSATION[:2], CONVERSATION  # The next prompt begins with the first one.
    replies, prefilled = [], []
    for keep in (4096, 0):
        backend = LocalHFBackend(tiny_dir, context_window=4096, prefix_cache_tokens=keep)
        await backend.load()
        first, full = backend.count_tokens(first_turn), backend.count_tokens(next_turn)
        replies.append(["".join(await collect(backend, messages=m)) for m in (first_turn, next_turn)])
        prefilled.append(backend.batcher.prefilled_tokens)
        await backend.aclose()
    assert replies[0] == replies[1]
    assert prefilled[1] == first + full
    # Only what follows the first prompt (give or take a token merged across the join) is run again.
    assert 0 < prefilled[0] - first <= full - first + 2 < full


async def test_a_finished_reply_is_kept_for_the_session_s_next_prompt(tiny_dir: Path) -> None:
    """Token ids, not text, so that the test does not depend on the reply's text encoding back to its tokens."""

    def generate(backend: LocalHFBackend, ids: list[int]) -> list[int]:
        emitted: list[int] = []
        request = Request(torch.tensor([ids]), 12, None, Sampling(), emit=emitted.append)
        backend.batcher.submit(request)
        request.done.result(timeout=120)
        return emitted

    replies, prefilled = [], []
    for keep in (4096, 0):
        backend = LocalHFBackend(tiny_dir, context_window=4096, prefix_cache_tokens=keep)
        await backend.load()
        prompt = list(range(100, 140))
        reply = generate(backend, prompt)
        before = backend.batcher.prefilled_tokens
        replies.append([reply, generate(backend, [*prompt, *reply, 150, 151, 152])])
        prefilled.append(backend.batcher.prefilled_tokens - before)
        await backend.aclose()
    assert replies[0] == replies[1] and len(replies[0][0]) == 12
    # Kept: the prompt and all but the reply's last token (never run through the model), so the next prompt
    # runs from that token on. Not kept: all of it again.
    assert prefilled == [1 + 3, len(prompt) + 12 + 3]


async def test_max_batch_bounds_the_batch(tiny_dir: Path) -> None:
    backend = LocalHFBackend(tiny_dir, context_window=4096, max_batch=2)
    await backend.load()
    alone = "".join(await collect(backend))
    with model_thread_held(backend) as release:
        streams = [asyncio.create_task(collect(backend)) for _ in range(5)]
        await until_waiting(backend, 5)
        release.set()
        together = ["".join(deltas) for deltas in await asyncio.gather(*streams)]
    assert together == [alone] * 5
    assert backend.batcher.largest_batch == 2
    await backend.aclose()


async def test_mid_conversation_system_message_is_rendered_as_is(
    backend: LocalHFBackend, tokenizer: PreTrainedTokenizerBase
) -> None:
    conversation = [{"role": m.role, "content": m.content} for m in CONVERSATION]
    rendered = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert "<|im_start|>system\nRight now, user looks HAPPY (46)<|im_end|>" in rendered
    assert backend.count_tokens(CONVERSATION) == len(tokenizer(rendered, add_special_tokens=False)["input_ids"])


async def test_strict_template_gets_readouts_folded_into_user_turns(
    tmp_path: Path, tiny_dir: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    strict = AutoTokenizer.from_pretrained(tiny_dir)
    strict.chat_template = STRICT_TEMPLATE
    strict.save_pretrained(tmp_path)
    AutoModelForCausalLM.from_pretrained(tiny_dir).save_pretrained(tmp_path)
    with pytest.raises(Exception, match="system only first"):
        strict.apply_chat_template([{"role": m.role, "content": m.content} for m in CONVERSATION], tokenize=False)

    backend = LocalHFBackend(tmp_path)
    await backend.load()
    system, turns = fold_system_messages(CONVERSATION)
    assert turns[-1].content.startswith("[Facial expression readout] Right now, user looks HAPPY (46)\n\n")
    folded = [{"role": "system", "content": system}] + [{"role": m.role, "content": m.content} for m in turns]
    expected: Any = strict.apply_chat_template(folded, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert backend.count_tokens(CONVERSATION) == len(expected["input_ids"])
    assert await collect(backend)
    await backend.aclose()


@pytest.mark.filterwarnings("error::UserWarning")  # PEFT warns when an adapter is not loaded cleanly.
async def test_lora_adapters_at_runtime(backend: LocalHFBackend, tiny_dir: Path, adapter_dirs: dict[str, Path]) -> None:
    base = "".join(await collect(backend))
    assert backend.adapters() == []

    await backend.add_adapter("calm", adapter_dirs["calm"])
    with_calm = "".join(await collect(backend, adapter="calm"))
    assert with_calm != base
    assert with_calm == reference(tiny_dir, CONVERSATION, GREEDY.max_new_tokens, adapter_dirs["calm"])

    await backend.add_adapter("warm", adapter_dirs["warm"])
    assert backend.adapters() == ["calm", "warm"]
    with_warm = "".join(await collect(backend, adapter="warm"))
    assert with_warm not in (base, with_calm)
    assert with_warm == reference(tiny_dir, CONVERSATION, GREEDY.max_new_tokens, adapter_dirs["warm"])

    # Both stay live: switching back and forth, and to the base model, gives the same outputs again.
    assert "".join(await collect(backend, adapter="calm")) == with_calm
    assert "".join(await collect(backend)) == base
    assert "".join(await collect(backend, adapter="warm")) == with_warm
    assert backend.model_id() == tiny_dir.name
    assert backend.model_id("calm") == f"{tiny_dir.name}+calm"


@pytest.fixture(scope="module")
def foreign_adapter_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: PreTrainedTokenizerBase) -> Path:
    """An adapter made for a different (wider) model, so its weights do not fit the tiny one."""
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    other = tmp_path_factory.mktemp("other-llama")
    LlamaForCausalLM(config).save_pretrained(other)
    return make_adapter(other, tmp_path_factory.mktemp("foreign"), seed=3)


async def test_adapter_errors(
    backend: LocalHFBackend, adapter_dirs: dict[str, Path], foreign_adapter_dir: Path, tmp_path: Path
) -> None:
    base = await collect(backend)
    with pytest.raises(BackendError, match="unknown adapter 'nope'"):
        await collect(backend, adapter="nope")
    with pytest.raises(BackendError, match="not a PEFT adapter folder"):
        await backend.add_adapter("empty", tmp_path)
    with pytest.raises(BackendError, match="could not load adapter 'foreign'"):
        await backend.add_adapter("foreign", foreign_adapter_dir)
    assert backend.adapters() == []
    assert not isinstance(backend.model, PeftModel)
    assert not [name for name, _ in backend.model.named_modules() if "lora" in name]
    assert await collect(backend) == base  # A failed load leaves the model as it was.

    await backend.add_adapter("calm", adapter_dirs["calm"])
    with pytest.raises(BackendError, match="already loaded"):
        await backend.add_adapter("calm", adapter_dirs["warm"])
    with pytest.raises(BackendError, match="could not load adapter 'foreign'"):
        await backend.add_adapter("foreign", foreign_adapter_dir)
    assert backend.adapters() == ["calm"]
    assert isinstance(backend.model, PeftModel) and list(backend.model.peft_config) == ["calm"]
    assert await collect(backend) == base
    assert "".join(await collect(backend, adapter="calm")) != "".join(base)


async def test_not_loaded_and_context_window(tiny_dir: Path) -> None:
    backend = build_backend("local", model_path=tiny_dir, context_window=4096)
    assert isinstance(backend, LocalHFBackend)
    with pytest.raises(BackendError, match="not loaded"):
        backend.count_tokens(CONVERSATION)
    await backend.load()
    assert backend.context_window == 1024  # Capped by the model's max_position_embeddings.
    long = [Message("user", "word " * 2000)]
    with pytest.raises(BackendError, match="context window"):
        await collect(backend, messages=long)
    await backend.aclose()
    with pytest.raises(BackendError, match="not loaded"):
        await collect(backend)


@pytest.mark.slow
async def test_real_smollm2_gguf_streams_a_reply(tmp_path: Path) -> None:
    """Loads the real GGUF (dequantised, then cached) and streams a reply to a conversation with a readout."""
    cache = tmp_path / "smollm2-dequantised"
    from_gguf = LocalHFBackend(ARTIFACTS / GGUF, cache_dir=cache)
    await from_gguf.load()
    from_cache = LocalHFBackend(ARTIFACTS, gguf_file=GGUF, cache_dir=cache)
    await from_cache.load()
    assert from_gguf.load_info is not None and from_gguf.load_info.source == "gguf"
    assert from_cache.load_info is not None and from_cache.load_info.source == "cache"
    assert from_cache.model_id() == "SmolLM2-135M-Instruct"

    params = GenerationParams(temperature=0.0, max_new_tokens=60)
    start = time.perf_counter()
    first_delta_s = 0.0
    deltas: list[str] = []
    async for delta in from_cache.stream(CONVERSATION, params):
        first_delta_s = first_delta_s or time.perf_counter() - start
        deltas.append(delta)
    total_s = time.perf_counter() - start
    text = "".join(deltas)
    assert text.strip()
    assert text == "".join(await collect(from_gguf, params))  # The cache holds the same model.
    packed = LocalHFBackend(ARTIFACTS, gguf_file=GGUF, cache_dir=cache, weights="float16")
    await packed.load()
    assert packed.load_info is not None and packed.load_info.packed_layers == 30 * 7 + 1  # Every layer, LM head.
    assert "".join(await collect(packed, params)).strip()
    await packed.aclose()

    tokens = len(AutoTokenizer.from_pretrained(cache)(text)["input_ids"])
    print(
        f"\nSmolLM2 GGUF: load {from_gguf.load_info.load_s:.1f} s from GGUF (dequantise + cache), "
        f"{from_cache.load_info.load_s:.2f} s from the cache; warm-up {from_cache.load_info.warmup_s:.2f} s\n"
        f"prompt {from_cache.count_tokens(CONVERSATION)} tokens; first text after {first_delta_s * 1000:.0f} ms; "
        f"{tokens} tokens in {total_s:.2f} s = {tokens / total_s:.1f} tokens/s "
        f"({(tokens - 1) / (total_s - first_delta_s):.1f} tokens/s after the first)\n"
        f"reply: {text!r}"
    )
    await from_gguf.aclose()
    await from_cache.aclose()


async def test_the_first_word_is_sent_without_waiting_for_the_next() -> None:
    from emili_chat.llm.local_hf import _FirstTokenStreamer

    vocabulary = {1: "Hello", 2: " there", 3: " friend", 4: "\n", 5: "\ufffd"}

    class Words:
        def decode(self, ids: list[int], **kwargs: object) -> str:
            return "".join(vocabulary[i] for i in ids)

    streamer = _FirstTokenStreamer(Words(), skip_prompt=False)
    for token in (1, 2, 3):
        streamer.put(torch.tensor([token]))
    streamer.end()
    sent = [text async for text in streamer]
    assert sent[0] == "Hello" and "".join(sent) == "Hello there friend"  # Then word by word, as before.
    # Blank text or half a character is held until the first real text; a line break flushes as before.
    held = _FirstTokenStreamer(Words(), skip_prompt=False)
    for token in (4, 5, 1):
        held.put(torch.tensor([token]))
    held.end()
    assert [text async for text in held if text] == ["\n", "\ufffdHello"]
