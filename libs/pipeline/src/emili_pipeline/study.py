"""After ``emili pipeline run``: a study on the gateway in which people talk to base and the model the pipeline
trained, and an invite link to it (``make demo`` prints both beside its report).

Only the gateway's HTTP API is used (``/api/v1``, admin token), never its code: this library imports no service.
Idempotent: a study of the same name (which names its arms) is reused, and so is an invite that still has uses
and time left.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import httpx

from emili_pipeline.pipeline import State, model_arms

API = "/api/v1"
INVITE_USES = 20  # People per demo link.
INVITE_SECONDS = 7 * 24 * 3600
_KEEP_INVITE_SECONDS = 24 * 3600  # An invite expiring sooner than this is not handed out again.
CONSENT = (
    "This is a demonstration of EMILI, an AI that listens and responds to how you feel. You will chat with it for a "
    "few turns. If you allow the camera, your face is read about once a second to estimate your expression; frames "
    "are kept only if you tick the box to store them. You answer a few questions before and after, and rate the "
    "replies. You may stop at any time, and withdraw later with the code shown at the end."
)


class StudyUnavailable(Exception):
    """The gateway could not be asked, or refused; the message says why."""


@dataclass(frozen=True)
class DemoStudy:
    study_id: str
    name: str
    arms: list[str]
    invite_url: str
    invite_uses_left: int
    invite_expires_ms: int
    reused_study: bool
    reused_invite: bool


def demo_arms(state: State) -> list[str]:
    """``base`` and the pipeline's DPO model version (its SFT version when DPO made none)."""
    arms = model_arms(state)
    trained = arms.get("dpo") or arms.get("sft")
    return ["base", trained] if trained else ["base"]


def demo_name(arms: list[str]) -> str:
    return "EMILI demo: " + " vs ".join(arms)


def _call(http: httpx.Client, method: str, path: str, **kwargs: Any) -> Any:
    try:
        response = http.request(method, f"{API}{path}", **kwargs)
    except httpx.TransportError as exc:
        raise StudyUnavailable(
            f"the gateway at {http.base_url} is not reachable ({type(exc).__name__}: {exc}); is it running (make up)?"
        ) from None
    if not response.is_success:
        try:
            detail = response.json().get("detail") or response.text
        except (ValueError, AttributeError):
            detail = response.text.strip() or response.reason_phrase
        raise StudyUnavailable(f"the gateway at {http.base_url} answered {response.status_code}: {detail}")
    return response.json()


def ensure_demo_study(http: httpx.Client, arms: list[str]) -> DemoStudy:
    """The demo study with these arms (created unless one of its name exists) and an invite link to it.

    ``http`` is a client for the gateway's root URL carrying an admin token.
    """
    name = demo_name(arms)
    studies = _call(http, "GET", "/studies")["studies"]
    existing = [s for s in studies if s["name"] == name and [a["arm"] for a in s["arms"]] == arms]
    if existing:
        study, reused_study = existing[-1], True
    else:
        arm_specs = [{"arm": arm, "weight": 1} for arm in arms]
        spec = {"name": name, "arms": arm_specs, "consent_text": CONSENT, "max_turns": 10}
        study, reused_study = _call(http, "POST", "/studies", json=spec), False
    study_id = study["study_id"]
    now_ms = int(time.time() * 1000)
    invites = _call(http, "GET", f"/studies/{study_id}/invites")["invites"]
    usable = [
        i for i in invites if i["uses"] < i["max_uses"] and i["expires_ms"] > now_ms + _KEEP_INVITE_SECONDS * 1000
    ]
    if usable:
        invite, reused_invite = usable[-1], True
    else:
        body = {"count": 1, "max_uses": INVITE_USES, "expires_in_seconds": INVITE_SECONDS}
        invite, reused_invite = _call(http, "POST", f"/studies/{study_id}/invites", json=body)["invites"][0], False
    return DemoStudy(
        study_id=study_id,
        name=name,
        arms=arms,
        invite_url=invite["url"],
        invite_uses_left=invite["max_uses"] - invite["uses"],
        invite_expires_ms=invite["expires_ms"],
        reused_study=reused_study,
        reused_invite=reused_invite,
    )
