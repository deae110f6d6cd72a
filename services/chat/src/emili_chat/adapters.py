"""Model arms: "base" or a registered model version whose LoRA adapter is loaded on first use."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from emili_chat.llm import BackendError, ChatBackend
from emili_core.errors import DependencyUnavailable, InvalidInput, NotFound
from emili_core.objectstore import ObjectStore
from emili_session.loop_records import check_gate_not_failed
from emili_session.registry import check_servable, check_version, download_adapter

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

    async def resolve(self, arm: str, *, synthetic: bool = False) -> str | None:
        """``synthetic``: the session is a simulated user's, which may meet a version the evaluation gate
        rejected (measuring such candidates is what studies do); a person's session never does."""
        if arm == BASE_ARM:
            return None
        try:
            check_version(arm)
        except InvalidInput:
            raise InvalidInput(f"invalid model arm {arm!r}: letters, digits, '.', '_' or '-', at most 64") from None
        async with self._lock:
            loaded = await self._served(arm)
            if self.objects is not None:
                await self._check_servable(arm, loaded, synthetic=synthetic)
            if loaded:
                return arm
            if self.objects is None:
                raise NotFound(f"model arm {arm!r} is not loaded and no object store is configured")
            path = await asyncio.to_thread(download_adapter, self.objects, arm, self.cache_dir / arm)
            try:
                await self.backend.add_adapter(arm, path)
            except BackendError as exc:
                # Never fall back to the base model: the session asked for this arm.
                raise DependencyUnavailable(f"model arm {arm!r} could not be loaded: {exc}") from exc
            log.info("loaded adapter %s from object storage", arm)
            return arm

    async def _check_servable(self, arm: str, loaded: bool, *, synthetic: bool) -> None:
        """A version retired after a withdrawal starts no new session, and one the evaluation gate rejected serves
        no person. Asked at every session start, since a withdrawal or a verdict can come while the adapter is
        loaded; an outage of the store does not stop a loaded arm."""
        assert self.objects is not None
        try:
            await asyncio.to_thread(check_servable, self.objects, arm)
            if not synthetic:
                await asyncio.to_thread(check_gate_not_failed, self.objects, arm)
        except DependencyUnavailable:
            if not loaded:
                raise
            log.warning("could not check whether model arm %s was retired (object store unavailable)", arm)

    async def _served(self, arm: str) -> bool:
        try:
            return await self.backend.has_adapter(arm)
        except BackendError as exc:
            raise DependencyUnavailable(f"the model server cannot say whether it serves {arm!r}: {exc}") from exc
