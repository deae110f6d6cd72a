"""Pytest fixtures for EMILI's tests: real Redis and S3 servers on free ports, tokens, settings.

Loaded as a plugin by the repository's root conftest.py. Servers are started once per test session
in temporary folders and stopped at the end; nothing is shared with a running local stack.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from emili_core.auth import create_token
from emili_core.objectstore import ObjectStore
from emili_core.settings import S3Settings

TEST_SECRET = "test-secret-0123456789abcdef0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _binary(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed; run `make setup`")
    return found


def _wait(check: object, what: str, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{what} exited with {process.returncode}")
        try:
            if check():  # type: ignore[operator]
                return
        except Exception:
            pass
        time.sleep(0.1)
    pytest.fail(f"{what} did not become ready in {timeout} s")


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass(frozen=True)
class Stack:
    redis_url: str
    s3: S3Settings

    def env(self) -> dict[str, str]:
        """Environment for a process (service, worker) that should use these servers."""
        return {
            "EMILI_ENV": "test",
            "EMILI_REDIS_URL": self.redis_url,
            "EMILI_S3__ENDPOINT": self.s3.endpoint,
            "EMILI_S3__ACCESS_KEY": self.s3.access_key.get_secret_value(),
            "EMILI_S3__SECRET_KEY": self.s3.secret_key.get_secret_value(),
            "EMILI_S3__REGION": self.s3.region,
            "EMILI_S3__BUCKET_PREFIX": self.s3.bucket_prefix,
            "EMILI_AUTH__SECRET": TEST_SECRET,
        }


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    folder = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        [
            _binary("redis-server"),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(folder),
            "--appendonly",
            "yes",
            "--save",
            "",
        ],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    _wait(lambda: redis.Redis.from_url(url).ping(), "redis-server", process)
    yield url
    _stop(process)


@pytest.fixture(scope="session")
def s3_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Settings]:
    port = free_port()
    folder = tmp_path_factory.mktemp("s3")
    settings = S3Settings(endpoint=f"127.0.0.1:{port}", bucket_prefix="test-")
    keys = f"{settings.access_key.get_secret_value()},{settings.secret_key.get_secret_value()}"
    process = subprocess.Popen(
        [
            _binary("rclone"),
            "serve",
            "s3",
            str(folder),
            "--addr",
            settings.endpoint,
            "--auth-key",
            keys,
            "--force-path-style=true",
            "--log-level",
            "ERROR",
        ],
        stdout=subprocess.DEVNULL,
    )
    _wait(lambda: ObjectStore(settings).client.list_buckets() is not None, "rclone serve s3", process)
    yield settings
    _stop(process)


@pytest.fixture
def isolated_redis_url(redis_url: str) -> Iterator[str]:
    """An empty Redis database of the test server, for tests that scan every key (sweepers, reconcilers) and
    must not see what other tests left in database 0."""
    url = f"{redis_url.rsplit('/', 1)[0]}/9"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


@pytest.fixture(scope="session")
def stack(redis_url: str, s3_settings: S3Settings) -> Stack:
    return Stack(redis_url, s3_settings)


@pytest.fixture
def stack_env(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Points settings made in this process at the test servers."""
    env = stack.env()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture
def object_store(s3_settings: S3Settings) -> ObjectStore:
    store = ObjectStore(s3_settings)
    store.ensure_buckets()
    return store


def token(scopes: list[str], subject: str = "test-user", secret: str = TEST_SECRET) -> str:
    return create_token(secret, subject, scopes, ttl_seconds=600)


def gpu_available() -> bool:
    return shutil.which("nvidia-smi") is not None and os.environ.get("CUDA_VISIBLE_DEVICES", "0") != ""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` are skipped on machines without an NVIDIA GPU."""
    if gpu_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class EntryPointProcess:
    """One of the project's console scripts (``emili-fer-worker``, ...) run as a real process in its own
    process group, so that :meth:`kill` (SIGKILL) takes it and its threads down at once, as a crash would."""

    def __init__(self, script: str, env: dict[str, str], log: Path) -> None:
        self.log = log
        self.process = subprocess.Popen(
            [str(Path(sys.executable).parent / script)],
            env=env,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        if self.alive():
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.alive():
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


def tiny_llama(tokenizer: Any, seed: int = 0) -> Any:
    """A random 2-layer Llama (hidden size 32) over ``tokenizer``'s vocabulary: a real causal LM that loads,
    trains and generates in milliseconds, for tests of the code around models. Imports torch lazily."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)
