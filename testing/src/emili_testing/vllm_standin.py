"""A stand-in for a vLLM OpenAI-compatible server, for tests without a GPU: a real HTTP server process.

It speaks the part of vLLM's API that the chat service uses: ``GET /v1/models``, ``POST /v1/chat/completions``
(streamed as Server-Sent Events, or whole), ``POST /v1/load_lora_adapter`` and ``POST /v1/unload_lora_adapter``
(present only with runtime LoRA updating, as vLLM's ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``), with vLLM's status codes
and error bodies. Replies are deterministic per model name and conversation and begin with ``[<model>]``, so a
test sees which model (the base or which adapter) answered.

    python -m emili_testing.vllm_standin --port 8000 --model emili-base --lora-modules v1=/adapters/v1
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

WORDS = ("I", "hear", "you", "that", "sounds", "hard", "tell", "me", "more", "about", "it", "today", "how", "feel")


def reply_words(model: str, messages: Sequence[dict[str, Any]], max_tokens: int) -> list[str]:
    """The reply of ``model``: ``[<model>]`` and then words chosen by a hash of the model and the last message."""
    last = str(messages[-1].get("content", "")) if messages else ""
    digest = hashlib.sha256(f"{model}\n{last}".encode()).digest()
    words = [f"[{model}]", *(WORDS[b % len(WORDS)] for b in digest[:12])]
    return words[:max_tokens]


def _error(status: int, kind: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": status}}, status)


def create_app(
    model: str, api_key: str = "", lora_modules: dict[str, str] | None = None, runtime_lora: bool = True
) -> FastAPI:
    app = FastAPI()
    loras: dict[str, str] = dict(lora_modules or {})

    @app.middleware("http")
    async def authenticate(request: Request, call_next: Any) -> Response:
        # vLLM's --api-key guards /v1 only; /health stays open for probes.
        if (
            api_key
            and request.url.path.startswith("/v1")
            and request.headers.get("authorization") != f"Bearer {api_key}"
        ):
            return JSONResponse({"error": "Unauthorized"}, 401)
        response: Response = await call_next(request)
        return response

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        cards = [{"id": model, "object": "model", "owned_by": "vllm", "root": model, "parent": None}]
        cards += [
            {"id": name, "object": "model", "owned_by": "vllm", "root": path, "parent": model}
            for name, path in loras.items()
        ]
        return {"object": "list", "data": cards}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await request.json()
        name = body.get("model")
        if name != model and name not in loras:
            return _error(404, "NotFoundError", f"The model `{name}` does not exist.")
        messages = body.get("messages") or []
        max_tokens = int(body.get("max_tokens") or 16)
        words = reply_words(name, messages, max_tokens)
        finish = "length" if len(words) == max_tokens else "stop"
        if not body.get("stream"):
            message = {"role": "assistant", "content": " ".join(words)}
            return JSONResponse({"model": name, "choices": [{"index": 0, "message": message, "finish_reason": finish}]})

        async def events() -> AsyncIterator[str]:
            def chunk(delta: dict[str, str], finish_reason: str | None = None) -> str:
                choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
                return (
                    f"data: {json.dumps({'object': 'chat.completion.chunk', 'model': name, 'choices': [choice]})}\n\n"
                )

            yield chunk({"role": "assistant", "content": ""})
            for index, word in enumerate(words):
                yield chunk({"content": word if index == 0 else f" {word}"})
            yield chunk({}, finish)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    if runtime_lora:

        @app.post("/v1/load_lora_adapter")
        async def load_lora_adapter(request: Request) -> Response:
            body = await request.json()
            name, path = body.get("lora_name"), body.get("lora_path")
            if not name or not path:
                return _error(400, "BadRequestError", "Both 'lora_name' and 'lora_path' must be provided.")
            if name in loras:
                return _error(400, "BadRequestError", f"The lora adapter '{name}' has already been loaded.")
            if not (Path(path) / "adapter_config.json").is_file():
                return _error(404, "NotFoundError", f"Loading lora {name} failed: No adapter found for {path}")
            loras[name] = path
            return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

        @app.post("/v1/unload_lora_adapter")
        async def unload_lora_adapter(request: Request) -> Response:
            name = (await request.json()).get("lora_name")
            if name not in loras:
                return _error(404, "NotFoundError", f"The lora adapter '{name}' cannot be found.")
            del loras[name]
            return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    return app


@contextlib.contextmanager
def running_standin(
    port: int,
    model: str = "emili-base",
    api_key: str = "",
    lora_modules: dict[str, str] | None = None,
    runtime_lora: bool = True,
    timeout_s: float = 30.0,
) -> Iterator[str]:
    """Run the stand-in as a process on ``127.0.0.1:port``; yields its OpenAI base URL (``.../v1``)."""
    command = [sys.executable, "-m", "emili_testing.vllm_standin", "--port", str(port), "--model", model]
    command += ["--api-key", api_key] if api_key else []
    command += [arg for name, path in (lora_modules or {}).items() for arg in ("--lora-modules", f"{name}={path}")]
    command += [] if runtime_lora else ["--no-runtime-lora"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"vLLM stand-in exited: {process.stderr.read().decode() if process.stderr else ''}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM stand-in did not answer on port {port} within {timeout_s} s")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", default="emili-base", help="the base model's served name")
    parser.add_argument("--api-key", default="")
    parser.add_argument("--lora-modules", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--no-runtime-lora", action="store_true", help="no /v1/load_lora_adapter (vLLM's default)")
    args = parser.parse_args(argv)
    loras = dict(item.split("=", 1) for item in args.lora_modules)
    app = create_app(args.model, args.api_key, loras, runtime_lora=not args.no_runtime_lora)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
