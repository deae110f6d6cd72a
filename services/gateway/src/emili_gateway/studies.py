"""Studies, invites, participants, arm assignment and session records: the gateway's own state, no transport.

Durable copies live in object storage (bucket ``sessions``):

    <prefix>/<study>/study.json                    the study as created (immutable)
    <prefix>/<study>/participants/<participant>.json
    <prefix>/<study>/sessions/<session>.json       the gateway's session record (arm, consent, progress)
    <prefix>/<study>/withdrawals/<participant>.json  the request; ``deleted`` and what was removed once done
    <prefix>/_index/<study>.json                   one per study, so listing studies reads no session keys

Redis holds what must change atomically (``<redis_prefix>:``): invites and their use counts, the per-study
arm counts, session records (turns, surveys done), the withdraw-code index, and rate-limit windows.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import random
import re
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import redis
import redis.asyncio as aioredis

from emili_core.errors import DependencyUnavailable, FailedPrecondition, InvalidInput, NotFound
from emili_core.leases import RELEASE_IF_HELD, TAKE_OR_RENEW
from emili_core.objectstore import Bucket, ObjectStore
from emili_gateway.canary import DECISION_FIELDS, Canary, draw_candidate
from emili_gateway.errors import Gone
from emili_gateway.models import (
    ArmProgress,
    Invite,
    InviteRequest,
    Participant,
    Progress,
    SessionRecord,
    Study,
    StudySpec,
)
from emili_gateway.settings import StudyStoreSettings
from emili_session.loop_records import check_gate_not_failed
from emili_session.registry import check_servable, is_retired, registered_model

log = logging.getLogger(__name__)
T = TypeVar("T")

BASE_ARM = "base"  # Chat's arm for the model without an adapter.
STUDY_ID = re.compile(r"^st-[0-9a-f]{12}$")
PARTICIPANT_ID = re.compile(r"^p-[0-9a-f]{16}$")
INVITE_CODE = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")

# Picks the arm furthest below its weighted share of the study's assignments so far; ARGV lists (arm, weight)
# pairs in a random order, and a strict comparison keeps the first of equal deficits: ties break at random.
_ASSIGN_ARM = """
local total, n = 0, 0
for i = 1, #ARGV, 2 do
  total = total + tonumber(ARGV[i + 1])
  n = n + tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0')
end
local best, best_deficit = nil, nil
for i = 1, #ARGV, 2 do
  local count = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0')
  local deficit = tonumber(ARGV[i + 1]) / total * (n + 1) - count
  if best == nil or deficit > best_deficit + 1e-9 then
    best, best_deficit = ARGV[i], deficit
  end
end
redis.call('HINCRBY', KEYS[1], best, 1)
return best
"""

# One use of an invite, if it exists, has not expired and has uses left: checked and counted atomically.
_REDEEM = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing', ''} end
local expires = tonumber(redis.call('HGET', KEYS[1], 'expires_ms'))
if expires <= tonumber(ARGV[1]) then return {'expired', tostring(expires)} end
local uses = tonumber(redis.call('HGET', KEYS[1], 'uses'))
local max_uses = tonumber(redis.call('HGET', KEYS[1], 'max_uses'))
if uses >= max_uses then return {'used', tostring(max_uses)} end
redis.call('HINCRBY', KEYS[1], 'uses', 1)
return {'ok', redis.call('HGET', KEYS[1], 'study_id')}
"""

# Counts one user message unless the session has ended (-2) or reached its limit (-1; ARGV[1], 0 = no limit).
_COUNT_TURN = """
if redis.call('HGET', KEYS[1], 'state') == '"ended"' then return -2 end
local turns = tonumber(redis.call('HGET', KEYS[1], 'turns') or '0')
local limit = tonumber(ARGV[1])
if limit > 0 and turns >= limit then return -1 end
redis.call('HINCRBY', KEYS[1], 'turns', 1)
redis.call('HSET', KEYS[1], 'last_activity_ms', ARGV[2])
return turns + 1
"""


# Forgets one of the gateway's session records once chat and the labeler deleted the session's data: counts it
# as withdrawn for its arm (progress keeps the number, not the record) and removes the record and its set entries,
# once, even if two drainers race (KEYS: session, study sessions, participant sessions, withdrawn counts; ARGV:
# session id). 1 when it was there.
_FORGET_SESSION = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local arm = cjson.decode(redis.call('HGET', KEYS[1], 'arm') or '""')
redis.call('HINCRBY', KEYS[4], arm, 1)
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('SREM', KEYS[3], ARGV[1])
return 1
"""


def now_ms() -> int:
    return int(time.time() * 1000)


def _format_time(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ms / 1000))


def new_withdraw_code() -> str:
    """Sixteen base32 characters in four groups: easy to copy down, 80 bits of chance."""
    raw = base64.b32encode(secrets.token_bytes(10)).decode()
    return "-".join(raw[i : i + 4] for i in range(0, 16, 4))


def withdraw_hash(code: str) -> str:
    normalised = re.sub(r"[^A-Z2-7]", "", code.upper())
    return hashlib.sha256(normalised.encode()).hexdigest()


# Attempts at recording a canary that must still run (others' looks may change it meanwhile).
CANARY_SAVE_TRIES = 5


class StudyEngine:
    def __init__(self, options: StudyStoreSettings, client: aioredis.Redis, objects: ObjectStore) -> None:
        self.options = options
        self.redis = client
        self.objects = objects
        self.p = options.redis_prefix
        self.replica = secrets.token_hex(8)  # Names this process in locks shared with other gateway replicas.
        self._studies: dict[str, Study] = {}  # Studies never change after creation, so caching is safe.
        self._assign_arm = client.register_script(_ASSIGN_ARM)
        self._redeem = client.register_script(_REDEEM)
        self._count_turn = client.register_script(_COUNT_TURN)
        self._forget_session = client.register_script(_FORGET_SESSION)

    # --- plumbing ---------------------------------------------------------------------------------------

    async def _r(self, what: str, awaitable: Any) -> Any:
        """Await a Redis call (redis-py types them loosely); an unreachable Redis is a dependency error."""
        try:
            return await awaitable
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise DependencyUnavailable(f"Redis is unavailable while trying to {what}; please try again") from exc

    async def _s3(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(fn, *args)

    def _key(self, *parts: str) -> str:
        return ":".join((self.p, *parts))

    def study_object(self, study_id: str) -> str:
        return f"{self.options.prefix}/{study_id}/study.json"

    def session_object(self, study_id: str, session_id: str) -> str:
        return f"{self.options.prefix}/{study_id}/sessions/{session_id}.json"

    def participant_object(self, study_id: str, participant_id: str) -> str:
        return f"{self.options.prefix}/{study_id}/participants/{participant_id}.json"

    def withdrawal_object(self, study_id: str, participant_id: str) -> str:
        return f"{self.options.prefix}/{study_id}/withdrawals/{participant_id}.json"

    def _index_prefix(self) -> str:
        return f"{self.options.prefix}/_index/"

    async def ping(self) -> None:
        await self._r("answer a ping", self.redis.ping())

    # --- studies ----------------------------------------------------------------------------------------

    async def _check_servable_version(self, version: str, not_registered: str) -> None:
        """A model version people may be served: registered (else InvalidInput ``not_registered``), not retired,
        and not rejected by its evaluation gate (those raise their own errors, naming why)."""
        try:
            await self._s3(registered_model, self.objects, version)
        except NotFound:
            raise InvalidInput(not_registered) from None
        await self._s3(check_servable, self.objects, version)
        await self._s3(check_gate_not_failed, self.objects, version)

    async def create_study(self, spec: StudySpec, created_by: str) -> Study:
        for arm in spec.arms:
            if arm.arm != BASE_ARM:
                await self._check_servable_version(
                    arm.arm,
                    f"arm {arm.arm!r} is neither 'base' nor a registered model version; "
                    "list the versions with `emili trainer models`",
                )
        study = Study(
            **spec.model_dump(), study_id=f"st-{secrets.token_hex(6)}", created_ms=now_ms(), created_by=created_by
        )
        await self._s3(self.objects.put_json, Bucket.SESSIONS, self.study_object(study.study_id), study.model_dump())
        # The index entry is written last: a listed study always has its study.json.
        await self._s3(
            self.objects.put_json, Bucket.SESSIONS, f"{self._index_prefix()}{study.study_id}.json", {"created": True}
        )
        self._studies[study.study_id] = study
        return study

    async def get_study(self, study_id: str) -> Study:
        if study_id in self._studies:
            return self._studies[study_id]
        if not STUDY_ID.match(study_id):
            raise NotFound(f"study {study_id!r} does not exist (study ids look like st-0123456789ab)")
        try:
            raw = await self._s3(self.objects.get_json, Bucket.SESSIONS, self.study_object(study_id))
        except NotFound:
            raise NotFound(f"study {study_id} does not exist") from None
        study = Study.model_validate(raw)
        self._studies[study_id] = study
        return study

    async def list_studies(self) -> list[Study]:
        keys = await self._s3(self.objects.list_keys, Bucket.SESSIONS, self._index_prefix())
        ids = [k.rsplit("/", 1)[-1].removesuffix(".json") for k in keys]
        studies = [await self.get_study(i) for i in ids if STUDY_ID.match(i)]
        return sorted(studies, key=lambda s: s.created_ms)

    # --- invites ----------------------------------------------------------------------------------------

    async def create_invites(self, study: Study, request: InviteRequest) -> list[Invite]:
        created = now_ms()
        expires = created + request.expires_in_seconds * 1000
        ttl = request.expires_in_seconds + self.options.keep_expired_invites_seconds
        invites = [
            Invite(
                code=secrets.token_urlsafe(12),
                study_id=study.study_id,
                max_uses=request.max_uses,
                uses=0,
                expires_ms=expires,
                created_ms=created,
            )
            for _ in range(request.count)
        ]
        pipe = self.redis.pipeline(transaction=True)
        for invite in invites:
            key = self._key("invite", invite.code)
            fields: dict[Any, Any] = invite.model_dump(exclude={"code", "url"})
            pipe.hset(key, mapping=fields)
            pipe.expire(key, ttl)
            pipe.sadd(self._key("study", study.study_id, "invites"), invite.code)
        await self._r("create invites", pipe.execute())
        return invites

    async def list_invites(self, study: Study) -> list[Invite]:
        members = await self._r("list invites", self.redis.smembers(self._key("study", study.study_id, "invites")))
        codes = sorted(_str(c) for c in members)
        pipe = self.redis.pipeline(transaction=False)
        for code in codes:
            pipe.hgetall(self._key("invite", code))
        rows = await self._r("read invites", pipe.execute())
        invites = []
        for code, raw in zip(codes, rows, strict=True):
            if raw:
                fields = {_str(k): _str(v) for k, v in raw.items()}
                invites.append(Invite(code=code, **fields))
        return sorted(invites, key=lambda i: (i.created_ms, i.code))

    async def running(self, study: Study) -> bool:
        """Whether the study takes new participants now: one of its invites can still be redeemed."""
        now = now_ms()
        return any(i.uses < i.max_uses and i.expires_ms > now for i in await self.list_invites(study))

    async def redeem(self, code: str, participant_ttl_seconds: int) -> tuple[Participant, str]:
        """One use of an invite: a new pseudonymous participant of its study and their withdraw code."""
        if not INVITE_CODE.match(code):
            raise NotFound("this invite code does not exist; check the link or ask the researcher for a new one")
        result = await self._r("redeem an invite", self._redeem(keys=[self._key("invite", code)], args=[now_ms()]))
        status, value = (_str(v) for v in result)
        if status == "missing":
            raise NotFound("this invite code does not exist; check the link or ask the researcher for a new one")
        if status == "expired":
            raise Gone(f"this invite expired on {_format_time(int(value))}; ask the researcher for a new link")
        if status == "used":
            uses = "once" if value == "1" else f"{value} times"
            raise FailedPrecondition(
                f"this invite has already been used {uses}, its limit; ask the researcher for a new link"
            )
        study = await self.get_study(value)
        code_for_withdrawal = new_withdraw_code()
        participant = Participant(
            participant_id=f"p-{secrets.token_hex(8)}",
            study_id=study.study_id,
            invite=code,
            created_ms=now_ms(),
            withdraw_hash=withdraw_hash(code_for_withdrawal),
        )
        key = self._key("participant", participant.participant_id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(key, mapping=_to_redis(participant.model_dump()))
        pipe.sadd(self._key("study", study.study_id, "participants"), participant.participant_id)
        pipe.set(self._key("withdraw", participant.withdraw_hash), participant.participant_id)
        await self._r("record a participant", pipe.execute())
        await self._s3(
            self.objects.put_json,
            Bucket.SESSIONS,
            self.participant_object(study.study_id, participant.participant_id),
            participant.model_dump(),
        )
        return participant, code_for_withdrawal

    # --- participants -----------------------------------------------------------------------------------

    async def participant(self, participant_id: str) -> Participant | None:
        if not PARTICIPANT_ID.match(participant_id):
            return None
        raw = await self._r("read a participant", self.redis.hgetall(self._key("participant", participant_id)))
        return Participant.model_validate(_from_redis(raw)) if raw else None

    async def participant_by_withdraw_code(self, code: str) -> Participant | None:
        value = await self._r("look up a withdraw code", self.redis.get(self._key("withdraw", withdraw_hash(code))))
        return await self.participant(_str(value)) if value else None

    async def retired(self, version: str) -> bool:
        """Whether ``version`` was retired after a withdrawal. With the store down, False: chat, which checks again at
        every session start, still refuses a retired version."""
        try:
            return await self._s3(is_retired, self.objects, version)
        except DependencyUnavailable:
            log.warning("could not check whether %s was retired (object store unavailable)", version)
            return False

    async def assign_arm(self, study: Study, participant: Participant) -> str:
        """The participant's arm: assigned once (balanced by weight, atomically), then the same for every session;
        except that a version retired since (promoted, or a canary's) gives way to what serves their study arm now."""
        if participant.arm:
            if not await self.retired(participant.arm):
                return participant.arm
            allocated = participant.study_arm or await self._promoted_into(study, participant.arm)
            if not allocated:
                return participant.arm  # A study arm itself: chat refuses it, and says why.
            return await self._record_arm(participant, await self.serving_arm(study.study_id, allocated), allocated)
        pairs = [(a.arm, a.weight) for a in study.arms]
        random.shuffle(pairs)
        args = [str(x) for pair in pairs for x in pair]
        allocated = _str(
            await self._r(
                "assign an arm", self._assign_arm(keys=[self._key("study", study.study_id, "arm_counts")], args=args)
            )
        )
        # Balance is kept over the study's own arms; a promoted candidate then serves in its arm's place, and a
        # running canary takes a share of that arm's newcomers.
        serving = await self.serving_arm(study.study_id, allocated)
        canary = await self.canary(study.study_id)
        if canary is not None and canary.state == "running" and await self.retired(canary.candidate):
            canary = None  # Retired since its last look: the monitor rolls it back at its next.
        arm = draw_candidate(canary, serving)
        if canary is not None and arm != serving:
            await self._r(
                "count a canary participant",
                self.redis.hincrby(self._key("study", study.study_id, "canary_counts"), str(canary.started_ms), 1),
            )
        return await self._record_arm(participant, arm, allocated)

    async def _promoted_into(self, study: Study, version: str) -> str:
        """The study arm ``version`` was promoted into ("" if none): for participants allocated before their study
        arm was recorded."""
        raw = await self._r("read promotions", self.redis.hgetall(self._key("study", study.study_id, "arm_map")))
        return next((a for a in sorted(_str(k) for k, v in raw.items() if _str(v) == version)), "")

    async def _record_arm(self, participant: Participant, arm: str, study_arm: str) -> str:
        participant.arm, participant.study_arm = arm, study_arm
        await self._r(
            "record the arm",
            self.redis.hset(
                self._key("participant", participant.participant_id),
                mapping={"arm": json.dumps(arm), "study_arm": json.dumps(study_arm)},
            ),
        )
        return arm

    async def start_session(self, participant: Participant) -> None:
        """Count a session start; refuse beyond the per-participant limit."""
        key = self._key("participant", participant.participant_id, "starts")
        started = await self._r("count a session", self.redis.incr(key))
        if started > self.options.max_sessions_per_participant:
            await self._r("count a session", self.redis.decr(key))
            raise FailedPrecondition(
                "you have already started this study's conversation; continue it in the window you started it "
                "in, or ask the researcher for a new invite"
            )

    async def cancel_session_start(self, participant: Participant) -> None:
        await self._r(
            "count a session", self.redis.decr(self._key("participant", participant.participant_id, "starts"))
        )

    # --- sessions ---------------------------------------------------------------------------------------

    async def save_session(self, record: SessionRecord, *, durable: bool = True) -> None:
        key = self._key("session", record.session_id)
        pipe = self.redis.pipeline(transaction=True)
        # Turns are only ever counted by _COUNT_TURN, so that a stale copy of the record cannot undo a count.
        pipe.hset(key, mapping=_to_redis(record.model_dump(exclude={"turns"})))
        pipe.hsetnx(key, "turns", 0)
        pipe.sadd(self._key("study", record.study_id, "sessions"), record.session_id)
        pipe.sadd(self._key("participant", record.participant_id, "sessions"), record.session_id)
        await self._r("record a session", pipe.execute())
        if durable:
            key = self.session_object(record.study_id, record.session_id)
            await self._s3(self.objects.put_json, Bucket.SESSIONS, key, record.model_dump())

    async def session(self, session_id: str) -> SessionRecord:
        if not SESSION_ID.match(session_id):
            raise NotFound(f"session {session_id!r} does not exist")
        raw = await self._r("read a session", self.redis.hgetall(self._key("session", session_id)))
        if not raw:
            raise NotFound(f"session {session_id} does not exist")
        return SessionRecord.model_validate(_from_redis(raw))

    async def update_session(self, record: SessionRecord, *, durable: bool = True, **changes: Any) -> SessionRecord:
        updated = record.model_copy(update={**changes, "last_activity_ms": now_ms()})
        await self.save_session(updated, durable=durable)
        return updated

    async def count_turn(self, session_id: str, max_turns: int | None) -> int | None:
        """The session's turn count after this user message, or None when it had reached ``max_turns``."""
        result = int(
            await self._r(
                "count a turn",
                self._count_turn(keys=[self._key("session", session_id)], args=[max_turns or 0, now_ms()]),
            )
        )
        if result == -2:
            raise FailedPrecondition("this conversation has ended; nothing more can be sent")
        return None if result < 0 else result

    async def uncount_turn(self, session_id: str) -> None:
        await self._r("count a turn", self.redis.hincrby(self._key("session", session_id), "turns", -1))

    async def _sessions(self, set_key: str) -> list[SessionRecord]:
        ids = sorted(_str(s) for s in await self._r("list sessions", self.redis.smembers(set_key)))
        pipe = self.redis.pipeline(transaction=False)
        for session_id in ids:
            pipe.hgetall(self._key("session", session_id))
        rows = await self._r("read sessions", pipe.execute())
        records = [SessionRecord.model_validate(_from_redis(raw)) for raw in rows if raw]
        return sorted(records, key=lambda r: (r.created_ms, r.session_id))

    async def study_sessions(self, study_id: str) -> list[SessionRecord]:
        return await self._sessions(self._key("study", study_id, "sessions"))

    async def participant_sessions(self, participant_id: str) -> list[SessionRecord]:
        return await self._sessions(self._key("participant", participant_id, "sessions"))

    # --- withdrawal -------------------------------------------------------------------------------------

    async def withdraw(self, participant: Participant, sessions: list[SessionRecord]) -> None:
        """Mark the participant and their sessions withdrawn, and record the request for deletion downstream."""
        participant.withdrawn = True
        key = self._key("participant", participant.participant_id)
        await self._r("record a withdrawal", self.redis.hset(key, "withdrawn", json.dumps(True)))
        for record in sessions:
            await self.save_session(record.model_copy(update={"withdrawn": True}))
        request = {
            "participant_id": participant.participant_id,
            "study_id": participant.study_id,
            "session_ids": [r.session_id for r in sessions],
            "requested_ms": now_ms(),
            "deleted": False,  # Set by the withdrawal drainer once chat and the labeler deleted the data.
        }
        await self._s3(
            self.objects.put_json,
            Bucket.SESSIONS,
            self.withdrawal_object(participant.study_id, participant.participant_id),
            request,
        )
        await self._r("queue a deletion", self.redis.rpush(self._key("withdrawals"), json.dumps(request)))

    async def withdrawal(self, study_id: str, participant_id: str) -> dict[str, Any] | None:
        """The participant's withdrawal record (with ``deleted`` and what was removed once done), or None."""
        try:
            raw = await self._s3(
                self.objects.get_json, Bucket.SESSIONS, self.withdrawal_object(study_id, participant_id)
            )
        except NotFound:
            return None
        return dict(raw)

    async def save_withdrawal(self, record: dict[str, Any]) -> None:
        key = self.withdrawal_object(record["study_id"], record["participant_id"])
        await self._s3(self.objects.put_json, Bucket.SESSIONS, key, record)

    async def forget_sessions(self, study_id: str, participant_id: str, session_ids: list[str]) -> dict[str, int]:
        """Remove the gateway's own records of deleted sessions (Redis, object storage, rate-limit windows),
        keeping only a per-arm count of withdrawn sessions for progress. Idempotent."""
        records = objects = 0
        for session_id in session_ids:
            keys = [
                self._key("session", session_id),
                self._key("study", study_id, "sessions"),
                self._key("participant", participant_id, "sessions"),
                self._key("study", study_id, "withdrawn_sessions"),
            ]
            records += int(await self._r("forget a session", self._forget_session(keys=keys, args=[session_id])))
            key = self.session_object(study_id, session_id)
            if await self._s3(self.objects.exists, Bucket.SESSIONS, key):
                await self._s3(self.objects.delete, Bucket.SESSIONS, key)
                objects += 1
            async for window in self.redis.scan_iter(match=self._key("rl", "*", session_id, "*"), count=1000):
                await self._r("forget a rate-limit window", self.redis.delete(window))
        return {"session_records": records, "session_objects": objects}

    async def withdrawn_counts(self, study_id: str) -> dict[str, int]:
        """Sessions per arm whose data were deleted after their participant withdrew."""
        raw = await self._r(
            "read withdrawn counts", self.redis.hgetall(self._key("study", study_id, "withdrawn_sessions"))
        )
        return {_str(k): int(v) for k, v in raw.items()}

    # --- canaries ---------------------------------------------------------------------------------------

    def canary_object(self, canary: Canary) -> str:
        return f"{self.options.prefix}/{canary.study_id}/canaries/{canary.started_ms}-{canary.candidate}.json"

    async def canary(self, study_id: str) -> Canary | None:
        """The study's newest canary (running or decided), or None."""
        raw = await self._r("read the canary", self.redis.get(self._key("study", study_id, "canary")))
        if not raw:
            return None
        return await self._with_participants(Canary.model_validate_json(raw))

    async def _with_participants(self, canary: Canary) -> Canary:
        counted = await self._r(
            "count canary participants",
            self.redis.hget(self._key("study", canary.study_id, "canary_counts"), str(canary.started_ms)),
        )
        return canary.model_copy(update={"participants": int(counted or 0)})

    async def canary_of(self, study_id: str, candidate: str) -> Canary | None:
        """``candidate``'s latest canary in the study (running or decided), or None: read from its durable record,
        so a candidate's decision and numbers stay visible after a later candidate's canary replaced it as the
        study's newest."""
        newest = await self.canary(study_id)
        if newest is not None and newest.candidate == candidate:
            return newest
        folder = f"{self.options.prefix}/{study_id}/canaries/"
        keys = await self._s3(self.objects.list_keys, Bucket.SESSIONS, folder)
        ours = [k for k in keys if k.removeprefix(folder).partition("-")[2] == f"{candidate}.json"]
        if not ours:
            return None
        started = max(ours, key=lambda k: int(k.removeprefix(folder).partition("-")[0] or 0))
        return await self._with_participants(
            Canary.model_validate(await self._s3(self.objects.get_json, Bucket.SESSIONS, started))
        )

    async def serving_arm(self, study_id: str, arm: str) -> str:
        """What serves ``arm`` now: the candidate promoted in its place, if any and not retired since."""
        mapped = await self._r("read promotions", self.redis.hget(self._key("study", study_id, "arm_map"), arm))
        if mapped and not await self.retired(_str(mapped)):
            return _str(mapped)
        return arm

    async def start_canary(self, study: Study, candidate: str, production: str, share: float, by: str) -> Canary:
        """``production`` must be what serves one of the study's arms now: a canary stands in for it, and the
        candidate was judged against it (the loop sends the version its gate compared with)."""
        await self.check_candidate(candidate, production)
        await self.check_serves(study, production)
        (canary,) = await self.start_canaries([study], candidate, production, share, by, alone=True)
        return canary

    async def start_canaries(
        self, studies: Sequence[Study], candidate: str, production: str, share: float, by: str, *, alone: bool = False
    ) -> list[Canary]:
        """One experiment in several studies: a canary in each, started at the same time and listing the others
        (unless ``alone``: one study's own canary), so that the monitor pools and decides them as one. The caller has
        checked the candidate (:meth:`check_candidate`) and that ``production`` serves each study
        (:meth:`check_serves`); a study running another canary is refused here, atomically."""
        started_ms, ids = now_ms(), [s.study_id for s in studies]
        canaries = [
            Canary(
                study_id=study_id,
                candidate=candidate,
                production=production,
                share=share,
                started_ms=started_ms,
                started_by=by,
                studies=[] if alone else ids,
            )
            for study_id in ids
        ]
        for _ in range(CANARY_SAVE_TRIES):
            if await self._start_experiment(canaries):
                try:
                    for canary in canaries:  # The durable records, once Redis took the canaries.
                        await self._s3(
                            self.objects.put_json, Bucket.SESSIONS, self.canary_object(canary), canary.model_dump()
                        )
                except DependencyUnavailable as exc:
                    # They run (allocation reads Redis); the monitor's next look writes the durable records.
                    log.warning("canaries of %s started; durable records wait for object storage: %s", candidate, exc)
                return canaries
        raise DependencyUnavailable(f"canaries of other versions kept starting while {candidate}'s did; try again")

    async def _start_experiment(self, canaries: Sequence[Canary]) -> bool:
        """Record the experiment's canaries and the candidate's index in one transaction (WATCH): refused when a study
        runs another canary or the candidate runs in another experiment; False when one of them changed meanwhile."""
        first = canaries[0]
        index = self._key("candidate", first.candidate, "canary_studies")
        study_keys = [self._key("study", c.study_id, "canary") for c in canaries]
        async with self.redis.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(index, *study_keys)
                indexed = await pipe.get(index)
                stored = [await pipe.get(key) for key in study_keys]
                others = [await pipe.get(self._key("study", i, "canary")) for i in json.loads(indexed or "[]")]
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                raise DependencyUnavailable("Redis is unavailable while trying to start a canary; try again") from exc
            for raw in stored:
                current = Canary.model_validate_json(raw) if raw else None
                if current is not None and current.state == "running":
                    raise already_running(current)
            running = [c for raw in others if raw and (c := Canary.model_validate_json(raw)).state == "running"]
            if elsewhere := [c.study_id for c in running if c.candidate == first.candidate]:
                raise FailedPrecondition(
                    f"{first.candidate} already runs as a canary in {', '.join(elsewhere)}; wait for its decision or "
                    "roll it back first"
                )
            pipe.multi()
            for canary in canaries:
                await self._queue_canary(pipe, canary)
            pipe.set(index, json.dumps([c.study_id for c in canaries]))
            try:
                await self._r("start the canary", pipe.execute())
            except redis.WatchError:
                return False
        return True

    async def serving_versions(self, study: Study) -> dict[str, str]:
        """What serves each of the study's arms now (:meth:`serving_arm`), by arm."""
        return {a.arm: await self.serving_arm(study.study_id, a.arm) for a in study.arms}

    async def check_serves(self, study: Study, production: str) -> None:
        """Refuse a canary standing in for ``production`` when it serves none of the study's arms now (409 when it
        served one before a promotion)."""
        serving = await self.serving_versions(study)
        if production not in serving.values():
            if production in serving:  # An arm a promoted version now serves in place of.
                raise FailedPrecondition(
                    f"arm {production!r} of study {study.study_id} is served by {serving[production]!r} since its "
                    f"promotion: a canary stands in for what serves now; name {serving[production]!r} (or no "
                    "production) if the candidate was judged against it"
                )
            raise InvalidInput(
                f"{production!r} serves no arm of study {study.study_id}; serving now: "
                f"{', '.join(f'{arm} by {version}' for arm, version in serving.items())}"
            )

    async def running_canary(self, study_id: str) -> Canary | None:
        current = await self.canary(study_id)
        return current if current is not None and current.state == "running" else None

    async def check_candidate(self, candidate: str, production: str) -> None:
        if candidate in (BASE_ARM, production):
            raise InvalidInput("the candidate must be a registered model version other than the production arm")
        await self._check_servable_version(candidate, f"{candidate!r} is not a registered model version")

    async def candidate_canaries(self, candidate: str) -> list[Canary]:
        """``candidate``'s latest experiment: its canaries in every study it was last started in together (one, for
        a canary started in one study), or [] if it never had one."""
        indexed = await self._r(
            "read the canary index", self.redis.get(self._key("candidate", candidate, "canary_studies"))
        )
        # Without the index (a canary started before there was one): every study is looked through.
        study_ids = json.loads(indexed) if indexed else [study.study_id for study in await self.list_studies()]
        found = [c for study_id in study_ids if (c := await self.canary_of(study_id, candidate))]
        if not found:
            return []
        latest = max(found, key=lambda c: c.started_ms)
        return sorted((c for c in found if c.same_experiment(latest)), key=lambda c: c.study_id)

    def _decision_key(self, canary: Canary) -> str:
        return self._key("canary_decision", canary.candidate, str(canary.started_ms))

    async def experiment_decision(self, canary: Canary) -> Canary | None:
        """The decision recorded for ``canary``'s experiment (the canaries of its candidate started with it, one per
        study), as ``canary`` decided; None while it runs."""
        raw = await self._r("read the canary's decision", self.redis.get(self._decision_key(canary)))
        return Canary.model_validate(canary.model_dump() | json.loads(raw)) if raw else None

    async def claim_decision(self, decided: Canary) -> tuple[Canary, bool]:
        """Record ``decided``'s decision as its experiment's unless one was recorded first (SET NX: the monitor, a
        researcher's rollback in any of its studies and a rollback of the whole experiment all go through here, so
        the studies of one experiment never take different decisions). Returns the experiment's decision, and
        whether it is this one."""
        payload = decided.model_dump_json(include=set(DECISION_FIELDS))
        if await self._r("record the canary's decision", self.redis.set(self._decision_key(decided), payload, nx=True)):
            return decided, True
        earlier = await self.experiment_decision(decided)
        if earlier is None:  # Cannot happen while Redis keeps its keys: the key was there a moment ago.
            raise DependencyUnavailable("the canary's decision could not be read back; try again")
        return earlier, False

    async def apply_decision(self, decision: Canary) -> list[Canary]:
        """Write the experiment's decision into each of its studies' canaries still running; those written."""
        written = []
        for study_id in decision.pooled_studies():
            mine = await self.canary_of(study_id, decision.candidate)
            if mine is None or not mine.same_experiment(decision) or mine.state != "running":
                continue
            mine = mine.with_decision(decision)
            if await self.save_canary(mine, while_running=True):
                written.append(mine)
        return written

    async def save_canary(self, canary: Canary, *, while_running: bool = False) -> bool:
        """Record the canary (S3 first: the durable record; with ``while_running``, once Redis took it) and, once
        promoted, map its arm to the candidate.

        ``while_running``: only if the study's stored canary is still this one, running. A monitor's look and a
        researcher's rollback start from what they read earlier, so without it the later write would undo the
        earlier decision; the first decision stands. Returns whether it was saved."""
        if not while_running:
            await self._s3(self.objects.put_json, Bucket.SESSIONS, self.canary_object(canary), canary.model_dump())
            pipe = self.redis.pipeline(transaction=True)
            await self._queue_canary(pipe, canary)
            await self._r("record the canary", pipe.execute())
            return True
        for _ in range(CANARY_SAVE_TRIES):
            saved = await self._save_if_running(canary)
            if saved is not None:
                return saved
        raise DependencyUnavailable(
            f"the canary of study {canary.study_id} kept changing while it was recorded; try again"
        )

    async def _save_if_running(self, canary: Canary) -> bool | None:
        """One optimistic attempt (WATCH): True saved; False not saved, the canary was decided or replaced; None not
        saved, it changed but still runs (e.g. a look's numbers), so another attempt may succeed. The durable record
        is written after Redis took the change: written before, a lost attempt would leave it stale."""
        key = self._key("study", canary.study_id, "canary")
        async with self.redis.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(key)
                stored = await pipe.get(key)
            except (redis.ConnectionError, redis.TimeoutError, redis.WatchError) as exc:
                raise DependencyUnavailable("Redis is unavailable while trying to read the canary; try again") from exc
            if not _same_running(stored, canary):
                return False
            pipe.multi()
            await self._queue_canary(pipe, canary)
            try:
                await self._r("record the canary", pipe.execute())
            except redis.WatchError:  # Changed meanwhile (or the connection dropped: read again below).
                current = await self._r("read the canary", self.redis.get(key))
                return None if _same_running(current, canary) else False
        await self._s3(self.objects.put_json, Bucket.SESSIONS, self.canary_object(canary), canary.model_dump())
        return True

    async def _queue_canary(self, pipe: Any, canary: Canary) -> None:
        """Queue the canary's Redis writes on ``pipe`` (a transaction)."""
        pipe.set(self._key("study", canary.study_id, "canary"), canary.model_dump_json())
        if canary.state == "running":
            pipe.sadd(self._key("canaries", "running"), canary.study_id)
        else:
            pipe.srem(self._key("canaries", "running"), canary.study_id)
        if canary.state == "promoted":
            arm_map = self._key("study", canary.study_id, "arm_map")
            # Every study arm that the production arm served is now served by the candidate (a retired promotion
            # serves nothing: its arm's own version does).
            for arm in {a.arm for a in (await self.get_study(canary.study_id)).arms}:
                if await self.serving_arm(canary.study_id, arm) == canary.production:
                    pipe.hset(arm_map, arm, canary.candidate)

    async def running_canaries(self) -> list[Canary]:
        ids = await self._r("list canaries", self.redis.smembers(self._key("canaries", "running")))
        found = [await self.canary(_str(i)) for i in sorted(ids)]
        return [c for c in found if c is not None and c.state == "running"]

    async def take_lock(self, name: str, ttl_s: float) -> bool:
        """True when this replica holds ``name`` for the next ``ttl_s`` (renewed by taking it again in time)."""
        key, ttl_ms = self._key("lock", name), int(ttl_s * 1000)
        return bool(await self._r("take a lock", self.redis.eval(TAKE_OR_RENEW, 1, key, self.replica, ttl_ms)))

    async def release_lock(self, name: str) -> None:
        """Give ``name`` up if this replica holds it, so another takes it over at once rather than after its TTL."""
        await self._r("release a lock", self.redis.eval(RELEASE_IF_HELD, 1, self._key("lock", name), self.replica))

    # --- progress ---------------------------------------------------------------------------------------

    async def progress(self, study: Study) -> Progress:
        sessions = await self.study_sessions(study.study_id)
        invites = await self.list_invites(study)
        participants = await self._r(
            "count participants", self.redis.scard(self._key("study", study.study_id, "participants"))
        )
        counts = await self._r("read arm counts", self.redis.hgetall(self._key("study", study.study_id, "arm_counts")))
        assigned = {_str(k): int(v) for k, v in counts.items()}
        forgotten = await self.withdrawn_counts(study.study_id)  # Deleted sessions: counted, no longer recorded.
        idle_before = now_ms() - self.options.abandoned_after_seconds * 1000
        arms = []
        for spec in study.arms:
            mine = [r for r in sessions if r.arm == spec.arm]
            withdrawn = [r for r in mine if r.withdrawn]
            kept = [r for r in mine if not r.withdrawn]
            completed = [r for r in kept if r.state == "ended" and r.rated]
            abandoned = [r for r in kept if r not in completed and max(r.last_activity_ms, r.created_ms) < idle_before]
            arms.append(
                ArmProgress(
                    arm=spec.arm,
                    weight=spec.weight,
                    assigned=assigned.get(spec.arm, 0),
                    active=len(kept) - len(completed) - len(abandoned),
                    completed=len(completed),
                    abandoned=len(abandoned),
                    withdrawn=len(withdrawn) + forgotten.get(spec.arm, 0),
                )
            )
        return Progress(
            study_id=study.study_id,
            participants=int(participants),
            invites=len(invites),
            invite_uses=sum(i.uses for i in invites),
            sessions=len(sessions) + sum(forgotten.values()),
            arms=arms,
        )


def _to_redis(values: dict[str, Any]) -> dict[Any, Any]:
    return {k: json.dumps(v) for k, v in values.items()}


def _same_running(stored: Any, canary: Canary) -> bool:
    """Whether the stored canary (Redis JSON) is ``canary``'s own, still running."""
    if not stored:
        return False
    current = Canary.model_validate_json(stored)
    same = (current.study_id, current.started_ms, current.candidate) == (
        canary.study_id,
        canary.started_ms,
        canary.candidate,
    )
    return current.state == "running" and same


def already_running(current: Canary) -> FailedPrecondition:
    return FailedPrecondition(
        f"study {current.study_id} already runs a canary of {current.candidate}; wait for its decision or roll it "
        "back first"
    )


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _from_redis(raw: dict[Any, Any]) -> dict[str, Any]:
    return {_str(k): json.loads(v) for k, v in raw.items()}


def check_feelings(chosen: list[str], vocabulary: list[str], what: str) -> list[str]:
    """The chosen feelings in the vocabulary's spelling; anything else is refused with the allowed list."""
    allowed = {v.casefold(): v for v in vocabulary}
    unknown = [c for c in chosen if c.casefold() not in allowed]
    if unknown:
        raise InvalidInput(f"{what} {unknown} are not offered by this study; choose from {vocabulary}")
    result = [allowed[c.casefold()] for c in chosen]
    if len(set(result)) != len(result):
        raise InvalidInput(f"{what} must not repeat a feeling")
    return result
