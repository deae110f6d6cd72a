"""A Hugging Face causal LM on this machine: a model folder, or a GGUF file dequantised on load.

All work on the model (loading, adding adapters, generating) runs on one worker thread per device, shared by
every local model on that device. That thread is the lock: the model is never used by two threads at once, and
an adapter is loaded between two decoding steps, never during one. Replies to several sessions are generated
together, one token each per step (continuous batching, :mod:`emili_chat.llm.batching`), so a new session
waits for one prefill and a step rather than for every reply ahead of it. Text comes back through
transformers' :class:`~transformers.AsyncTextIteratorStreamer` (the asyncio flavour of ``TextIteratorStreamer``),
so the event loop never blocks on a token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from jinja2 import TemplateError
from peft import PeftConfig, PeftModel, get_peft_model
from transformers import (
    AsyncTextIteratorStreamer,
    BatchEncoding,
    GenerationMixin,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from emili_chat.llm.base import BackendError, ChatBackend, GenerationParams, Message, ReplyEnd, fold_system_messages
from emili_chat.llm.batching import Batcher, Request, Sampling
from emili_chat.llm.packed_weights import pack_linear_layers
from emili_llm.causal_lm import LoadSource, ModelLoadError, ModelSource, load_causal_lm, torch_dtype

log = logging.getLogger(__name__)

T = TypeVar("T")
Conversation = list[dict[str, str]]
# A conversation with a system message in the middle, to find out once how the chat template copes.
_PROBE = [
    Message("system", "s"),
    Message("user", "u"),
    Message("assistant", "a"),
    Message("system", "r"),
    Message("user", "u"),
]


# torch on CPU gives each OS thread that computes its own OpenMP thread team; a second team competes with the
# first for the cores even when idle (measured on 2 cores: 60 tokens in 2.0 s, then 3.5 s once another thread
# had run a model). Hence one worker thread per device for all models, rather than one per model.
_WORKERS: dict[str, ThreadPoolExecutor] = {}
_WORKERS_LOCK = threading.Lock()


def _worker(device: torch.device) -> ThreadPoolExecutor:
    with _WORKERS_LOCK:
        if str(device) not in _WORKERS:
            _WORKERS[str(device)] = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"llm-{device}")
        return _WORKERS[str(device)]


class _FirstTokenStreamer(AsyncTextIteratorStreamer):  # type: ignore[misc]
    """Sends the first text as soon as a token makes some. transformers' streamers hold text back to a word's end,
    so the first word would wait for the next decoding step: with ten sessions in a batch, that step is a third
    of a second of everyone's time to first token. Later text keeps the word-by-word rule."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._first_pending = True

    def put(self, value: torch.Tensor) -> None:
        if not self._first_pending:
            super().put(value)
            return
        self.token_cache.extend(value.tolist())
        text = str(self.tokenizer.decode(self.token_cache, **self.decode_kwargs))
        if text.endswith("\n"):  # A line break flushes, as in the parent.
            self.token_cache, self.print_len = [], 0
            self._first_pending = not text.strip()
            self.on_finalized_text(text)
        elif text.strip() and not text.endswith("\ufffd"):  # Not blank, nor half of a multi-byte character.
            self._first_pending = False
            self.print_len = len(text)
            self.on_finalized_text(text)


@dataclass(frozen=True)
class LoadInfo:
    source: LoadSource  # "gguf": dequantised from the GGUF file; "cache": the folder saved after that.
    load_s: float  # Reading the tokenizer and weights (and saving the cache, when it was written).
    warmup_s: float
    packed_layers: int = 0  # Linear layers on packed float16 weights (0: all as loaded).


class LocalHFBackend(ChatBackend):
    """Runs a causal LM with transformers, optionally with PEFT LoRA adapters added at runtime.

    ``model_path`` is a Hugging Face model folder, or, with ``gguf_file``, the folder holding that GGUF file (a
    path to a ``.gguf`` file names both). Nothing is fetched from the Hub. With ``cache_dir``, the model
    dequantised from a GGUF file is saved there once and loaded from there afterwards, which is much faster.
    ``threads`` sets torch's thread count, a process-wide setting. ``max_batch`` replies are generated
    together at most; more wait for a place. The KV caches of recent prompts, up to ``prefix_cache_tokens``
    tokens in all (0: none), are kept so that a prompt beginning like one of them is prefilled only from where
    they differ. ``weights="float16"`` runs the linear layers of a float32 model on the CPU on packed float16
    weights (:mod:`emili_chat.llm.packed_weights`; LoRA adapters stay float32), as the chat service does.
    """

    name = "local"

    def __init__(
        self,
        model_path: Path,
        gguf_file: str | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        cache_dir: Path | None = None,
        context_window: int = 8192,
        threads: int | None = None,
        max_batch: int = 16,
        prefix_cache_tokens: int = 4096,
        weights: Literal["as_loaded", "float16"] = "as_loaded",
    ) -> None:
        model_path = Path(model_path)
        if gguf_file is None and model_path.suffix == ".gguf":
            model_path, gguf_file = model_path.parent, model_path.name
        self.model_path = model_path
        self.gguf_file = gguf_file
        self.device = torch.device(device)
        self.dtype = torch_dtype(dtype)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.context_window = context_window
        self.threads = threads or None
        self.load_info: LoadInfo | None = None
        self._base_id = ModelSource(model_path, gguf_file).base_id
        self._executor = _worker(self.device)
        self._model: PreTrainedModel | PeftModel | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._to_conversation: Callable[[Sequence[Message]], Conversation] = _as_is
        self._adapters: dict[str, Path] = {}
        self.max_batch = max_batch
        self.prefix_cache_tokens = prefix_cache_tokens
        self.weights = weights
        self._batcher: Batcher | None = None

    # --- the ChatBackend interface ---------------------------------------------------------------------------

    async def load(self) -> None:
        if self._model is None:
            await self._on_model_thread(self._load)

    def model_id(self, adapter: str | None = None) -> str:
        return self._base_id if adapter is None else f"{self._base_id}+{adapter}"

    def count_tokens(self, messages: Sequence[Message]) -> int:
        """Exact: the prompt as the chat template renders it, generation prompt included."""
        return len(self._encode(messages, return_tensors=None)["input_ids"])

    async def stream(
        self,
        messages: Sequence[Message],
        params: GenerationParams,
        adapter: str | None = None,
        end: ReplyEnd | None = None,
    ) -> AsyncIterator[str]:
        tokenizer = self._require_tokenizer()
        if adapter is not None and adapter not in self._adapters:
            raise BackendError(f"unknown adapter {adapter!r}; loaded: {sorted(self._adapters) or 'none'}")
        inputs = self._encode(messages, return_tensors="pt")
        prompt_tokens = int(inputs["input_ids"].shape[1])
        max_new_tokens = min(params.max_new_tokens, self.context_window - prompt_tokens)
        if max_new_tokens < 1:
            raise BackendError(f"prompt of {prompt_tokens} tokens fills the {self.context_window}-token context window")
        batcher = self._require_batcher()
        # skip_prompt=False: the batcher puts only new tokens, one at a time.
        streamer = _FirstTokenStreamer(tokenizer, skip_prompt=False, skip_special_tokens=True)
        request = Request(
            inputs["input_ids"],
            max_new_tokens,
            adapter,
            self._sampling(params),
            emit=lambda token: streamer.put(torch.tensor([token])),
        )
        # Runs where the request ends (the model thread, or here when withdrawn); ending twice is harmless.
        request.done.add_done_callback(lambda _: streamer.end())
        batcher.submit(request)
        try:
            async for text in streamer:
                if text:
                    yield text
            await asyncio.wrap_future(request.done)  # A failure surfaces here, after the text made before it.
            if end is not None:
                end.at_limit = request.at_limit
        finally:
            request.stop.set()
            # A request still waiting is simply withdrawn; one in the batch leaves at the next step, and that is
            # awaited so that nothing is posted to a loop that has gone.
            if not batcher.withdraw(request):
                with contextlib.suppress(Exception):
                    await asyncio.shield(asyncio.wrap_future(request.done))

    async def add_adapter(self, adapter_id: str, path: Path) -> None:
        """Load a PEFT LoRA folder (``adapter_config.json`` and weights) next to the adapters already live."""
        self._require_tokenizer()
        path = Path(path)
        if not (path / "adapter_config.json").is_file():
            raise BackendError(f"{path} is not a PEFT adapter folder (no adapter_config.json)")
        await self._on_model_thread(self._add_adapter, adapter_id, path)

    def adapters(self) -> list[str]:
        return sorted(self._adapters)

    async def aclose(self) -> None:
        """Drop the model (the worker thread is shared, and stays); generations under way fail at their next step."""
        self._model, self._tokenizer, self._batcher = None, None, None

    @property
    def batcher(self) -> Batcher:
        """The sequences under way and waiting, for inspection."""
        return self._require_batcher()

    @property
    def model(self) -> PreTrainedModel | PeftModel:
        """The live model (a ``PeftModel`` once an adapter is loaded), for inspection."""
        if self._model is None:
            raise BackendError("the local model is not loaded; call load() first")
        return self._model

    # --- on the model thread ----------------------------------------------------------------------------------

    async def _on_model_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.wrap_future(self._executor.submit(fn, *args))

    def _load(self) -> None:
        if self._model is not None:  # Another load() call got here first.
            return
        if self.threads:
            torch.set_num_threads(self.threads)
        start = time.perf_counter()
        source, tokenizer, model = self._read_weights()
        load_s = time.perf_counter() - start
        if tokenizer.chat_template is None:
            raise BackendError(f"{self.model_path} has no chat template")
        model.to(self.device).eval()  # type: ignore[arg-type]  # functools.wraps hides to()'s signature.
        packed_layers = pack_linear_layers(model) if self.weights == "float16" else 0
        self._to_conversation = _conversation_style(tokenizer)
        limit = getattr(model.config, "max_position_embeddings", None)
        if isinstance(limit, int) and limit < self.context_window:
            self.context_window = limit
        self._tokenizer, self._model = tokenizer, model
        eos = _eos_ids(model, tokenizer)
        self._batcher = Batcher(
            lambda: self.model, self._executor, self.device, eos, self.max_batch, self.prefix_cache_tokens
        )
        start = time.perf_counter()
        self._generate_sync(dict(tokenizer("Hello", return_tensors="pt")), max_new_tokens=2)
        self.load_info = LoadInfo(source, load_s, time.perf_counter() - start, packed_layers)
        log.info(
            "loaded %s from %s in %.1f s (%d linear layers on packed float16 weights), warm-up %.2f s",
            self._base_id,
            source,
            load_s,
            packed_layers,
            self.load_info.warmup_s,
        )

    def _read_weights(self) -> tuple[LoadSource, PreTrainedTokenizerBase, PreTrainedModel]:
        try:
            return load_causal_lm(ModelSource(self.model_path, self.gguf_file, self.cache_dir), self.dtype)
        except ModelLoadError as exc:
            raise BackendError(str(exc)) from exc

    def _add_adapter(self, adapter_id: str, path: Path) -> None:
        if adapter_id in self._adapters:  # Checked here, on the model thread, so that two callers cannot race.
            raise BackendError(f"adapter {adapter_id!r} is already loaded")
        model = self.model
        wrapped: PeftModel | None = None
        try:
            if isinstance(model, PeftModel):
                model.load_adapter(str(path), adapter_name=adapter_id, is_trainable=False)
            else:
                wrapped = _wrap(model, adapter_id, path)
                wrapped.load_adapter(str(path), adapter_name=adapter_id, is_trainable=False)
                model = wrapped
        except Exception as exc:
            # Leave the model as it was: a half-added adapter would linger in every later generation.
            if wrapped is not None:
                wrapped.unload()
            elif isinstance(model, PeftModel) and adapter_id in model.peft_config:
                model.delete_adapter(adapter_id)
            raise BackendError(f"could not load adapter {adapter_id!r} from {path}: {exc}") from exc
        self._model = model.eval()
        self._adapters[adapter_id] = path
        log.info("adapter %s loaded from %s; live: %s", adapter_id, path, self.adapters())

    def _generate_sync(self, inputs: dict[str, torch.Tensor], **kwargs: Any) -> None:
        tokenizer, model = self._require_tokenizer(), self.model
        pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if not isinstance(model, PeftModel | GenerationMixin):
            raise BackendError(f"{type(model).__name__} cannot generate text")
        with torch.inference_mode():
            model.generate(**{k: v.to(self.device) for k, v in inputs.items()}, pad_token_id=pad_token_id, **kwargs)

    def _sampling(self, params: GenerationParams) -> Sampling:
        """What ``generate`` would do with these params: what they leave unset (top_k, repetition_penalty) comes
        from the model's generation_config, else transformers' defaults (top_k=50 when sampling)."""
        config = getattr(self.model, "generation_config", None)
        top_k = getattr(config, "top_k", None)
        penalty = getattr(config, "repetition_penalty", None)
        return Sampling(
            temperature=max(params.temperature, 0.0),
            top_p=params.top_p,
            top_k=50 if top_k is None else int(top_k),
            repetition_penalty=1.0 if penalty is None else float(penalty),
            seed=params.seed,
        )

    def _encode(self, messages: Sequence[Message], return_tensors: Literal["pt"] | None) -> BatchEncoding:
        encoded = self._require_tokenizer().apply_chat_template(
            self._to_conversation(messages), add_generation_prompt=True, return_dict=True, return_tensors=return_tensors
        )
        assert isinstance(encoded, BatchEncoding)  # return_dict=True
        return encoded

    def _require_batcher(self) -> Batcher:
        if self._batcher is None:
            raise BackendError("the local model is not loaded; call load() first")
        return self._batcher

    def _require_tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            raise BackendError("the local model is not loaded; call load() first")
        return self._tokenizer


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The tokens that end a reply: the generation config's (one or a list) and the tokenizer's."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(configured if isinstance(configured, list) else [] if configured is None else [configured])
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return {int(i) for i in ids}


def _wrap(model: PreTrainedModel, adapter_id: str, path: Path) -> PeftModel:
    """Wrap the model for its first adapter: LoRA layers are injected in place, so the base weights are shared
    and ``disable_adapter`` gives the plain model back. Done apart from loading the weights (which is what
    ``PeftModel.from_pretrained`` does in one go) so that a failed load can be undone with ``unload``."""
    config = PeftConfig.from_pretrained(str(path))
    config.inference_mode = True
    config.base_model_name_or_path = model.name_or_path  # Applied to this model, wherever it was trained.
    wrapped = get_peft_model(model, config, adapter_name=adapter_id)
    if not isinstance(wrapped, PeftModel):
        raise BackendError(f"unsupported adapter type {type(wrapped).__name__}")
    return wrapped


# --- chat templates and system messages mid-conversation -----------------------------------------------------


def _as_is(messages: Sequence[Message]) -> Conversation:
    return [{"role": m.role, "content": m.content} for m in messages]


def _folded(messages: Sequence[Message]) -> Conversation:
    system, turns = fold_system_messages(messages)
    return ([{"role": "system", "content": system}] if system else []) + _as_is(turns)


def _folded_without_system(messages: Sequence[Message]) -> Conversation:
    system, turns = fold_system_messages(messages)
    conversation = _as_is(turns)
    if system and conversation:
        conversation[0]["content"] = f"{system}\n\n{conversation[0]['content']}"
    return conversation


def _conversation_style(tokenizer: PreTrainedTokenizerBase) -> Callable[[Sequence[Message]], Conversation]:
    """The least rewriting the model's chat template accepts.

    Many templates (SmolLM2's, ChatML) take any role anywhere, so messages go as they are; templates that
    insist on alternation get mid-conversation system messages folded into user turns; templates without a
    system role get the system prompt at the start of the first user turn.
    """
    for style in (_as_is, _folded, _folded_without_system):
        try:
            tokenizer.apply_chat_template(style(_PROBE), add_generation_prompt=True, tokenize=False)
        except TemplateError:
            continue
        return style
    raise BackendError("the model's chat template rejects every way of writing a conversation")
