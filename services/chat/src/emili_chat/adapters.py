"""Model arms: "base" or a registered model version whose LoRA adapter is loaded on first use."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from emili_chat.llm import ChatBackend
from emili_core.errors import InvalidInput, NotFound
from emili_core.objectstore import ObjectStore
from emili_session.registry import check_version, download_adapter

log = logging.getLogger(__name__)

BASE_ARM = "base"


class AdapterRegistry:
    """Resolves a model arm to the adapter the backend serves it with, downloading it from the registry once;
    several adapters then serve side by side without a restart."""

    def __init__(self, backend: ChatBackend, objects: ObjectStore | None, cache_dir: Path) -> None:
        self.backend = backend
        self.objects = objects
        self.cache_dir = cache_dir
        self._lock = asyncio.Lock()

    async def resolve(self, arm: str) -> str | None:
        if arm == BASE_ARM:
            return None
        try:
            check_version(arm)
        except InvalidInput:
            raise InvalidInput(f"invalid model arm {arm!r}: letters, digits, '.', '_' or '-', at most 64") from None
        async with self._lock:
            if arm in self.backend.adapters():
                return arm
            if self.objects is None:
                raise NotFound(f"model arm {arm!r} is not loaded and no object store is configured")
            path = await asyncio.to_thread(download_adapter, self.objects, arm, self.cache_dir / arm)
            await self.backend.add_adapter(arm, path)
            log.info("loaded adapter %s from object storage", arm)
            return arm
