"""Finding what is left of a session: every Redis key and S3 object that still names it (withdrawal tests)."""

from __future__ import annotations

from typing import Any

import redis

from emili_core.objectstore import Bucket, ObjectStore


def redis_mentions(client: redis.Redis, needle: str) -> list[str]:
    """Every Redis key whose name or value holds ``needle``."""
    found, raw = [], needle.encode()
    # A client made without decode_responses answers bytes; the redis stubs do not know that.
    for key in client.scan_iter(count=1000):
        answer: Any = client.type(key)
        kind = answer.decode()
        if kind == "string":
            values: list[Any] = [client.get(key)]
        elif kind == "hash":
            values = [x for pair in client.hgetall(key).items() for x in pair]
        elif kind == "list":
            values = client.lrange(key, 0, -1)
        elif kind == "set":
            values = list(client.smembers(key))
        elif kind == "zset":
            values = client.zrange(key, 0, -1)
        elif kind == "stream":
            entries: Any = client.xrange(key)
            values = [x for _, fields in entries for pair in fields.items() for x in pair]
        else:
            values = []
        if raw in key or any(raw in (v or b"") for v in values):
            found.append(key.decode())
    return sorted(found)


def objects_naming(store: ObjectStore, needle: str) -> list[str]:
    return sorted(f"{b.value}/{k}" for b in Bucket for k in store.list_keys(b, "") if needle in k)
