"""The OpenAI-compatible backend serving registered model versions as vLLM LoRA adapters, by name.

Against ``emili_testing.vllm_standin``, a real HTTP server process that speaks vLLM's API (models, streamed chat
completions, runtime LoRA loading), and, on a machine with a GPU and vLLM installed, against a real vLLM.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import grpc
import httpx
import pytest

from emili_chat import adapters as adapters_module
from emili_chat.adapters import AdapterRegistry
from emili_chat.llm import BackendError, GenerationParams, Message, OpenAICompatBackend, TransientBackendError
from emili_chat.llm.openai_compat import AdapterNotLoaded
from emili_core.errors import DependencyUnavailable
from emili_core.grpc_server import STATUS_FOR_ERROR
from emili_core.objectstore import ObjectStore
from emili_testing.plugin import free_port
from emili_testing.vllm_standin import running_standin

BASE = "emili-base"
API_KEY = "test-llm-key"
CONVERSATION = [Message("system", "You are EMILI."), Message("user", "I had a long day.")]
PARAMS = GenerationParams(temperature=0.0, max_new_tokens=64)


def make_adapter(root: Path, name: str) -> Path:
    """A folder shaped like a PEFT LoRA adapter (what vLLM checks for before loading)."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": BASE}))
    return folder


@pytest.fixture(scope="module")
def lora_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("adapters")


@pytest.fixture(scope="module")
def standin(lora_root: Path) -> Iterator[str]:
    preloaded = make_adapter(lora_root, "preloaded")
    with running_standin(free_port(), BASE, API_KEY, lora_modules={"preloaded": str(preloaded)}) as url:
        yield url


@pytest.fixture
async def backend(standin: str, lora_root: Path) -> AsyncIterator[OpenAICompatBackend]:
    vllm = OpenAICompatBackend(standin, API_KEY, BASE, lora_dir=str(lora_root))
    yield vllm
    await vllm.aclose()


async def reply(backend: OpenAICompatBackend, adapter: str | None = None) -> str:
    return "".join([delta async for delta in backend.stream(CONVERSATION, PARAMS, adapter)])


async def call(method: str, url: str, **kwargs: Any) -> httpx.Response:
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        return await client.request(method, url, **kwargs)


async def served_models(url: str) -> dict[str, Any]:
    response = await call("GET", f"{url}/models")
    return {card["id"]: card for card in response.json()["data"]}


async def test_base_model_answers_by_its_own_name(backend: OpenAICompatBackend) -> None:
    text = await reply(backend)
    assert text.startswith(f"[{BASE}] ")
    assert await reply(backend) == text  # Deterministic per model and conversation.


async def test_adapter_loaded_at_runtime_is_asked_for_by_name(
    backend: OpenAICompatBackend, standin: str, lora_root: Path
) -> None:
    folder = make_adapter(lora_root, "v-runtime")
    assert not await backend.has_adapter("v-runtime")
    await backend.add_adapter("v-runtime", folder)
    assert await backend.has_adapter("v-runtime")
    assert "v-runtime" in backend.adapters()
    card = (await served_models(standin))["v-runtime"]
    assert (card["parent"], card["root"]) == (BASE, str(folder))  # The path as the server sees it: lora_dir/name.
    text = await reply(backend, "v-runtime")
    assert text.startswith("[v-runtime] ")
    assert text.split(" ", 1)[1] != (await reply(backend)).split(" ", 1)[1]
    assert backend.model_id("v-runtime") == f"{BASE}+v-runtime"


async def test_another_replica_finds_the_adapter_already_loaded(
    backend: OpenAICompatBackend, standin: str, lora_root: Path
) -> None:
    folder = make_adapter(lora_root, "v-shared")
    await backend.add_adapter("v-shared", folder)
    other = OpenAICompatBackend(standin, API_KEY, BASE, lora_dir=str(lora_root))
    try:
        assert await other.has_adapter("v-shared")  # Listed by /v1/models, no second load.
        fresh = OpenAICompatBackend(standin, API_KEY, BASE, lora_dir=str(lora_root))
        await fresh.add_adapter("v-shared", folder)  # vLLM's 400 "already been loaded" is success.
        assert (await reply(fresh, "v-shared")).startswith("[v-shared] ")
        await fresh.aclose()
    finally:
        await other.aclose()


async def test_an_adapter_the_server_cannot_load_is_a_clear_permanent_error(
    backend: OpenAICompatBackend, lora_root: Path
) -> None:
    (lora_root / "v-empty").mkdir()
    with pytest.raises(BackendError, match=r"loading adapter 'v-empty' from .*v-empty failed.*No adapter found") as err:
        await backend.add_adapter("v-empty", lora_root / "v-empty")
    assert not isinstance(err.value, TransientBackendError)
    assert not await backend.has_adapter("v-empty")


async def test_an_adapter_gone_from_the_server_never_falls_back_to_the_base_model(
    backend: OpenAICompatBackend, standin: str, lora_root: Path
) -> None:
    await backend.add_adapter("v-gone", make_adapter(lora_root, "v-gone"))
    unloaded = await call("POST", f"{standin}/unload_lora_adapter", json={"lora_name": "v-gone"})
    assert unloaded.status_code == 200  # As after a vLLM restart: the server no longer has it.
    with pytest.raises(AdapterNotLoaded, match=r"'v-gone' is not served.*does not exist"):
        await reply(backend, "v-gone")
    assert "v-gone" not in backend.adapters()  # So the next session start loads it again.
    await backend.add_adapter("v-gone", lora_root / "v-gone")
    assert (await reply(backend, "v-gone")).startswith("[v-gone] ")


async def test_preloaded_adapters_serve_without_runtime_loading(standin: str) -> None:
    plain = OpenAICompatBackend(standin, API_KEY, BASE)  # No lora_dir: only what the server lists.
    try:
        with pytest.raises(BackendError, match="adapters not supported"):
            await reply(plain, "v-unknown")
        assert await plain.has_adapter("preloaded")
        assert (await reply(plain, "preloaded")).startswith("[preloaded] ")
        with pytest.raises(BackendError, match=r"adapters not supported.*lora_dir"):
            await plain.add_adapter("v-new", Path("v-new"))
    finally:
        await plain.aclose()


async def test_wrong_api_key_is_refused(standin: str) -> None:
    stranger = OpenAICompatBackend(standin, "wrong-key", BASE)
    try:
        with pytest.raises(BackendError, match="HTTP 401") as err:
            await reply(stranger)
        assert not isinstance(err.value, TransientBackendError)
    finally:
        await stranger.aclose()


# --- the adapter registry: model arms to adapters, with domain errors -------------------------------------------


@pytest.fixture
def downloads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Registry downloads without object storage, recorded; ``v-bad*`` versions come without adapter files."""
    downloaded: list[str] = []

    def download(_store: object, version: str, target: Path) -> Path:
        downloaded.append(version)
        if version.startswith("v-bad"):
            target.mkdir(parents=True, exist_ok=True)
            return target
        return make_adapter(target.parent, version)

    monkeypatch.setattr(adapters_module, "download_adapter", download)
    monkeypatch.setattr(adapters_module, "check_servable", lambda _store, _version: None)
    monkeypatch.setattr(adapters_module, "check_gate_not_failed", lambda _store, _version: None)
    return downloaded


async def test_registry_loads_arms_into_vllm_and_maps_failures_to_unavailable(
    backend: OpenAICompatBackend, lora_root: Path, downloads: list[str]
) -> None:
    registry = AdapterRegistry(backend, cast(ObjectStore, object()), lora_root)
    assert await registry.resolve("base") is None
    assert await registry.resolve("v-arm") == "v-arm"
    assert (await reply(backend, "v-arm")).startswith("[v-arm] ")
    assert await registry.resolve("v-arm") == "v-arm"
    assert await registry.resolve("preloaded") == "preloaded"  # Listed by the server.
    assert downloads == ["v-arm"], "one download per version; none for what the server already has"
    with pytest.raises(DependencyUnavailable, match="model arm 'v-bad' could not be loaded"):
        await registry.resolve("v-bad")
    assert STATUS_FOR_ERROR[DependencyUnavailable] == grpc.StatusCode.UNAVAILABLE


@pytest.mark.usefixtures("downloads")
async def test_registry_reports_a_server_that_is_down_as_unavailable(tmp_path: Path) -> None:
    down = OpenAICompatBackend(f"http://127.0.0.1:{free_port()}/v1", API_KEY, BASE, lora_dir=str(tmp_path))
    try:
        registry = AdapterRegistry(down, cast(ObjectStore, object()), tmp_path)
        with pytest.raises(DependencyUnavailable, match="cannot say whether it serves 'v-arm'"):
            await registry.resolve("v-arm")
    finally:
        await down.aclose()


# --- a real vLLM (GPU) -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def running_vllm(model: str, lora_root: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true", "HF_HUB_OFFLINE": "1"}
    args = ["--model", model, "--served-model-name", BASE, "--enable-lora", "--max-lora-rank", "64"]
    args += ["--port", str(port), "--api-key", API_KEY, "--gpu-memory-utilization", "0.5"]
    process = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", *args], env=env)
    try:
        yield process
    finally:
        process.terminate()
        process.wait(60)


@pytest.mark.gpu
@pytest.mark.slow
async def test_real_vllm_serves_an_adapter_by_name(tmp_path: Path) -> None:
    """EMILI_TEST_VLLM_MODEL: a local base model folder; EMILI_TEST_VLLM_ADAPTER: a PEFT LoRA adapter of it."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed")
    model, adapter = os.environ.get("EMILI_TEST_VLLM_MODEL"), os.environ.get("EMILI_TEST_VLLM_ADAPTER")
    if not (model and adapter):
        pytest.skip("set EMILI_TEST_VLLM_MODEL and EMILI_TEST_VLLM_ADAPTER (local folders)")
    port = free_port()
    with running_vllm(model, Path(adapter).parent, port) as process:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):  # Model loading and CUDA graph capture take minutes.
            assert process.poll() is None, "vLLM exited"
            with contextlib.suppress(httpx.TransportError):
                if (await call("GET", f"{url}/health", timeout=1.0)).status_code == 200:
                    break
            await asyncio.sleep(1.0)
        vllm = OpenAICompatBackend(f"{url}/v1", API_KEY, BASE, lora_dir=str(Path(adapter).parent))
        try:
            await vllm.add_adapter("v-real", Path(adapter))
            assert await vllm.has_adapter("v-real")
            assert await reply(vllm, "v-real")
            with pytest.raises(AdapterNotLoaded):
                await reply(vllm, "v-never-loaded")
        finally:
            await vllm.aclose()
