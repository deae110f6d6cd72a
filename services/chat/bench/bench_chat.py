"""Chat benchmark: emotion-injection overhead per turn, the default model's speed on CPU, concurrent sessions.

    python services/chat/bench/bench_chat.py [--turns 300] [--sessions 10] [--skip-overhead]

1. Injection overhead: the real engine and a real Redis server (started here), with a model that
   answers instantly, so the time from a user message to the first token is everything EMILI adds
   per turn (aggregate, readout text, recording the events, building the context). The FER round
   trip is measured separately: frames are analysed as they arrive, off the turn's path.
2. The default model (SmolLM2-135M-Instruct, local, CPU): time to first token and tokens/s.
3. N concurrent sessions on that model through the engine, all starting at once, each sending its next message
   when the reply to the last one is done: time to first token p50/p99, aggregate tokens/s, pooled over
   ``--session-rounds`` rounds (one round's aggregate moves with the reply lengths the model happens to draw).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence

import numpy as np
import redis.asyncio as aioredis
import torch

from emili_chat.engine import ChatEngine
from emili_chat.io_types import AssistantReply, ClientReading, Delta, SessionOptions, UserText
from emili_chat.llm import ChatBackend, GenerationParams, Message, ReplyEnd
from emili_chat.main import make_backend
from emili_chat.settings import ChatSettings
from emili_chat.store import SessionStore
from emili_core.auth import Principal
from emili_session.emotions import EMOTIONS
from emili_testing.plugin import free_port

USER = Principal("bench-user", frozenset({"chat"}))


class InstantBackend(ChatBackend):
    name = "instant"
    context_window = 8192

    async def load(self) -> None:
        return None

    def model_id(self, adapter: str | None = None) -> str:
        return "instant"

    def count_tokens(self, messages: Sequence[Message]) -> int:
        return sum(len(m.content) // 4 for m in messages)

    async def stream(
        self,
        messages: Sequence[Message],
        params: GenerationParams,
        adapter: str | None = None,
        end: ReplyEnd | None = None,
    ) -> AsyncIterator[str]:
        yield "ok"


def reply_tokens(backend: ChatBackend, text: str) -> int:
    """The reply's own tokens: an assistant message's count less the chat template's wrapping (31 tokens for
    SmolLM2, whose template also adds its default system prompt), which earlier runs counted as generated."""
    return backend.count_tokens([Message("assistant", text)]) - backend.count_tokens([Message("assistant", "")])


def pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(np.array(values) * 1e3, q)), 3)


async def first_token_times(
    engine: ChatEngine, turns: int, readings: bool, replies: list[str] | None = None
) -> list[float]:
    session = await engine.create_session(
        USER,
        store_frames=False,
        use_for_training=False,
        arm="",
        options=SessionOptions(post_response_reading_s=0.0, speak_on_change=False),
    )
    sent: list[float] = []
    latencies: list[float] = []
    answered = asyncio.Event()
    rng = np.random.default_rng(0)

    async def inputs() -> AsyncIterator[UserText | ClientReading]:
        for i in range(turns):
            if readings:
                p = rng.dirichlet(np.ones(7))
                yield ClientReading(True, dict(zip(EMOTIONS, p.tolist(), strict=True)), int(time.time() * 1000))
            answered.clear()
            sent.append(time.perf_counter())
            yield UserText(f"message number {i}, how are you?")
            await answered.wait()  # One turn at a time, as a person types.

    async for output in engine.converse(USER, session.session_id, inputs()):
        if isinstance(output, Delta) and len(latencies) < len(sent):
            latencies.append(time.perf_counter() - sent[len(latencies)])
        elif isinstance(output, AssistantReply):
            if replies is not None:
                replies.append(output.text)
            answered.set()
    return latencies


async def injection_overhead(settings: ChatSettings, redis_url: str, turns: int) -> dict[str, object]:
    client = aioredis.Redis.from_url(redis_url)
    engine = ChatEngine(settings, InstantBackend(), SessionStore(client))
    await first_token_times(engine, 20, True)  # Warm-up.
    with_face = await first_token_times(engine, turns, True)
    await client.aclose()
    return {
        "turns": turns,
        "user_message_to_first_token_ms_p50": pct(with_face, 50),
        "user_message_to_first_token_ms_p99": pct(with_face, 99),
        "note": "model answers instantly: this is EMILI's own work per turn (readout + 3 Redis appends + context)",
    }


async def model_speed(settings: ChatSettings, prompts: int) -> tuple[ChatBackend, dict[str, object]]:
    started = time.perf_counter()
    backend = make_backend(settings)
    await backend.load()
    load_s = time.perf_counter() - started
    system = settings.chat.system_prompt.read_text()
    ttfts, rates, lengths = [], [], []
    for i in range(prompts):
        messages = [
            Message("system", system),
            Message("system", "Right now, user looks HAPPY (46) Neutral (28)"),
            Message("user", f"I just got back from a walk in the park, it was lovely ({i})."),
        ]
        params = GenerationParams(temperature=1.0, max_new_tokens=160, seed=i)
        t0 = time.perf_counter()
        first, pieces = None, []
        async for delta in backend.stream(messages, params):
            first = first or time.perf_counter()
            pieces.append(delta)
        end = time.perf_counter()
        tokens = reply_tokens(backend, "".join(pieces))
        ttfts.append((first or end) - t0)
        if first and end > first:
            rates.append(tokens / (end - t0))
        lengths.append(tokens)
    return backend, {
        "model": backend.model_id(),
        "load_s": round(load_s, 1),
        "prompts": prompts,
        "ttft_ms_p50": pct(ttfts, 50),
        "ttft_ms_p99": pct(ttfts, 99),
        "tokens_per_s_mean": round(float(np.mean(rates)), 1) if rates else None,
        "reply_tokens_mean": round(float(np.mean(lengths)), 1),
        "prompt_tokens": backend.count_tokens(messages),
    }


async def concurrent_sessions(
    settings: ChatSettings, backend: ChatBackend, redis_url: str, sessions: int, turns: int, rounds: int
) -> dict[str, object]:
    """``sessions`` people typing at once, each waiting for the reply before the next message; ``rounds`` times.

    Reply lengths are drawn by the model, and one round's aggregate tokens/s moves with them (the batch thins out
    while the last long replies finish): the figures pool every round (all tokens over all the time), and each
    round is listed too."""
    client = aioredis.Redis.from_url(redis_url)
    engine = ChatEngine(settings, backend, SessionStore(client))
    ttfts: list[float] = []
    per_round: list[dict[str, object]] = []
    total_tokens = total_replies = 0
    total_elapsed = 0.0
    first = batcher_counts(backend)
    for _ in range(rounds):
        replies: list[str] = []
        before = batcher_counts(backend)
        started = time.perf_counter()
        results = await asyncio.gather(*(first_token_times(engine, turns, True, replies) for _ in range(sessions)))
        elapsed = time.perf_counter() - started
        ttfts += [t for r in results for t in r]
        tokens = sum(reply_tokens(backend, text) for text in replies)
        total_tokens, total_replies, total_elapsed = (
            total_tokens + tokens,
            total_replies + len(replies),
            total_elapsed + elapsed,
        )
        per_round.append(
            {
                "aggregate_tokens_per_s": round(tokens / elapsed, 1),
                "reply_tokens_mean": round(tokens / max(len(replies), 1), 1),
                "elapsed_s": round(elapsed, 1),
                **batching_stats(backend, before),
            }
        )
    await client.aclose()
    return {
        "sessions": sessions,
        "turns_per_session": turns,
        "rounds": rounds,
        "max_new_tokens": settings.chat.llm.max_new_tokens,
        "ttft_ms_p50": pct(ttfts, 50),
        "ttft_ms_p99": pct(ttfts, 99),
        "turns_per_minute": round(60 * len(ttfts) / total_elapsed, 1),
        "reply_tokens_mean": round(total_tokens / max(total_replies, 1), 1),
        "aggregate_tokens_per_s": round(total_tokens / total_elapsed, 1),
        "elapsed_s": round(total_elapsed, 1),
        **batching_stats(backend, first),
        "per_round": per_round,
    }


def batching_stats(backend: ChatBackend, before: dict[str, int] | None = None) -> dict[str, object]:
    """The local backend's batching since ``before`` (a :func:`batcher_counts`): largest and mean batch, decoding
    steps, and prompt tokens actually prefilled (the rest came from kept prefixes)."""
    counts = batcher_counts(backend)
    if not counts:
        return {}
    since = {key: value - (before or {}).get(key, 0) for key, value in counts.items()}
    return {
        "largest_batch": counts["largest_batch"],
        "mean_batch": round(since["stepped_sequences"] / max(since["decoding_steps"], 1), 2),
        "decoding_steps": since["decoding_steps"],
        "prefilled_tokens": since["prefilled_tokens"],
    }


def batcher_counts(backend: ChatBackend) -> dict[str, int]:
    batcher = getattr(backend, "batcher", None)
    if batcher is None:
        return {}
    names = ("largest_batch", "decoding_steps", "stepped_sequences", "prefilled_tokens")
    return {name: int(getattr(batcher, name)) for name in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=300)
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--session-turns", type=int, default=3)
    parser.add_argument("--session-rounds", type=int, default=3, help="the concurrent sessions, this many times")
    parser.add_argument("--skip-overhead", action="store_true", help="only the model parts (2 and 3)")
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        redis_server = subprocess.Popen(
            ["redis-server", "--port", str(port), "--dir", tmp, "--appendonly", "yes", "--save", ""],
            stdout=subprocess.DEVNULL,
        )
        time.sleep(0.5)
        redis_url = f"redis://127.0.0.1:{port}/0"
        os.environ["EMILI_REDIS_URL"] = redis_url
        # Queued sessions may wait long for their first token; measure that wait rather than time it out.
        os.environ.setdefault("EMILI_CHAT__LLM__FIRST_TOKEN_TIMEOUT_S", "900")
        settings = ChatSettings()
        try:
            report: dict[str, object] = {"machine": {"cpus": os.cpu_count()}}
            if not args.skip_overhead:
                report["injection_overhead"] = asyncio.run(injection_overhead(settings, redis_url, args.turns))

            async def model_parts() -> None:
                backend, speed = await model_speed(settings, args.prompts)
                report["machine"] = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}
                report["default_model"] = speed
                report["concurrent_sessions"] = await concurrent_sessions(
                    settings, backend, redis_url, args.sessions, args.session_turns, args.session_rounds
                )

            asyncio.run(model_parts())
        finally:
            redis_server.terminate()
            redis_server.wait(10)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    sys.exit(main())
