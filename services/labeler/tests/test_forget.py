"""``labeler.forget_sessions`` against a real S3 server: labels gone, datasets built from the sessions marked
withdrawn (data removed) and rebuilt without them, per-user weights without the user, an audit record; and no
label or dataset is made for a deleted session afterwards."""

from __future__ import annotations

import json
from typing import Any

import pytest

from emili_core.deletion import write_tombstone
from emili_core.errors import InvalidInput, NotFound
from emili_core.keys import DELETION_AUDIT_PREFIX, dataset_index_key, model_registry_key, session_record_keys
from emili_core.objectstore import Bucket, ObjectStore
from emili_core.records import dataset_manifest, dataset_withdrawal
from emili_core.settings import S3Settings
from emili_labeler import jobs, pipeline_steps
from emili_labeler.runtime import build_runtime
from emili_labeler.settings import LabelerSettings
from emili_pipeline.config import PipelineConfig
from emili_session.events import Event, EventKind
from emili_session.registry import model_withdrawal

pytestmark = pytest.mark.integration
T0 = 1_790_000_000_000
HAPPY = {"angry": 0.0, "disgust": 0.0, "fear": 0.0, "happy": 0.9, "sad": 0.0, "surprise": 0.0, "neutral": 0.1}
SAD = {"angry": 0.05, "disgust": 0.05, "fear": 0.0, "happy": 0.0, "sad": 0.8, "surprise": 0.0, "neutral": 0.1}
MILD = {"angry": 0.0, "disgust": 0.0, "fear": 0.0, "happy": 0.45, "sad": 0.0, "surprise": 0.0, "neutral": 0.55}
NEUTRAL = {"angry": 0.0, "disgust": 0.0, "fear": 0.0, "happy": 0.1, "sad": 0.1, "surprise": 0.0, "neutral": 0.8}


def store_session(
    store: ObjectStore, session_id: str, user: str, reply: str, reaction: dict[str, float], at_limit: bool = False
) -> None:
    """A persisted session record (as chat writes it): one user message, one reply (``at_limit``: cut off at the
    token limit), the face after it."""
    events: list[Event] = []

    def add(kind: EventKind, at: int, **payload: Any) -> None:
        events.append(Event(f"{at}-0", kind, at, payload))

    def reading(at: int, probabilities: dict[str, float]) -> None:
        add(
            EventKind.FER_READING, at, capture_time_ms=at, face_found=True, probabilities=probabilities, source="client"
        )

    add(
        EventKind.SESSION_CREATED, T0, model_arm="base", model_id="scripted", options={}, system_prompt="You are EMILI."
    )
    add(EventKind.PRE_SURVEY, T0 + 100, current_feelings=["Sad"], desired_feelings=[], text="I feel sad and tired.")
    reading(T0 + 900, NEUTRAL)
    add(EventKind.USER_MESSAGE, T0 + 1000, text="I failed my driving test today.")
    add(
        EventKind.ASSISTANT_MESSAGE,
        T0 + 3000,
        text=reply,
        turn_id="t1",
        unprompted=False,
        model_id="scripted",
        at_limit=at_limit,
    )
    reading(T0 + 3500, reaction)
    add(EventKind.POST_SURVEY, T0 + 20000, current_feelings=[], desired_feelings=[], text="I feel happy and calm.")
    keys = session_record_keys(session_id)
    lines = "".join(json.dumps(e.to_json()) + "\n" for e in events).encode()
    store.put_bytes(Bucket.SESSIONS, keys["events.jsonl"], lines)
    manifest = {
        "session_id": session_id,
        "user_id": user,
        "model_arm": "base",
        "use_for_training": True,
        "synthetic": False,
        "last_event_id": events[-1].event_id,
    }
    store.put_json(Bucket.SESSIONS, keys["session.json"], manifest)


@pytest.fixture(scope="module")
def runtime(s3_settings: S3Settings) -> jobs.Runtime:
    settings = LabelerSettings(s3=s3_settings)
    # No out-of-lexicon method: the lexicon alone, so no embedding model is loaded.
    return build_runtime(
        settings.model_copy(update={"labeler": settings.labeler.model_copy(update={"oov_method": "none"})})
    )


def test_forget_sessions(runtime: jobs.Runtime) -> None:
    store = runtime.store
    store_session(store, "fg-alice", "alice", "Oh no. How are you holding up?", HAPPY)
    store_session(store, "fg-bob", "bob", "Driving tests are pointless anyway.", SAD)
    store_session(store, "fg-carl", "carl", "That must sting. Want to talk it through?", HAPPY)
    sessions = ["fg-alice", "fg-bob", "fg-carl"]
    labels = {s: jobs.label_session(runtime, s) for s in sessions}
    assert labels["fg-alice"]["turns"][0]["flagged"] is True and labels["fg-bob"]["turns"][0]["flagged"] is False
    sft = jobs.build_sft_dataset(runtime, sessions)
    assert sft["source_sessions"] == ["fg-alice", "fg-carl"]  # Bob's only reply was not flagged.
    dpo = jobs.build_dpo_dataset(runtime, "feedback", sessions, seed=3)
    assert set(dpo["source_sessions"]) == {"fg-alice", "fg-bob", "fg-carl"}
    unrelated = jobs.build_sft_dataset(runtime, ["fg-carl"])
    store.put_json(
        Bucket.DATASETS,
        "user_weights/test.json",
        {"population": {}, "users": {"alice": {"n": 1}, "bob": {"n": 1}, "carl": {"n": 1}}},
    )
    # Versions the trainer registered from these sessions (lineage as it records it).
    for version, learned in (("fg-v-alice", ["fg-alice", "fg-carl"]), ("fg-v-carl", ["fg-carl"])):
        entry = {"version": version, "adapter_prefix": f"adapters/{version}/", "lineage": {"sessions": learned}}
        store.put_json(Bucket.MODELS, model_registry_key(version), entry)

    result = jobs.forget_sessions(runtime, ["fg-alice"], ["alice"], requested_by="p-alice", reason="withdrawal")

    assert result["labels"] == 1 and store.list_keys(Bucket.SESSIONS, "fg-alice/labels/") == []
    assert result["datasets_withdrawn"] == 2 and result["user_weight_entries"] == 1
    by_id = {d["id"]: d for d in result["datasets"]}
    assert set(by_id) == {sft["id"], dpo["id"]} and unrelated["id"] not in by_id
    # The default policy marks the version that learned from alice's session and does not retire it.
    assert result["models"] == ["fg-v-alice"] and result["models_marked"] == 1 and result["models_retired"] == 0
    assert (model_withdrawal(store, "fg-v-alice") or {})["withdrawn_sessions"] == ["fg-alice"]
    assert model_withdrawal(store, "fg-v-carl") is None

    # The SFT dataset: marked, its data removed, rebuilt without alice's session.
    withdrawal = dataset_withdrawal(store, sft["id"])
    assert withdrawal is not None and withdrawal["withdrawn_sessions"] == ["fg-alice"]
    assert not store.exists(Bucket.DATASETS, sft["key"])
    assert store.get_json(Bucket.DATASETS, dataset_index_key(sft["id"]))["withdrawn"].endswith("/withdrawn.json")
    replacement = dataset_manifest(store, by_id[sft["id"]]["replacement"])
    assert withdrawal["replacement"] == replacement["id"] and replacement["source_sessions"] == ["fg-carl"]
    assert dataset_withdrawal(store, replacement["id"]) is None
    assert "fg-alice" not in store.get_bytes(Bucket.DATASETS, replacement["key"]).decode()
    # The feedback pairs: alice's reply was bob's pair's chosen side, so only carl's with bob's is left.
    rebuilt_dpo = dataset_manifest(store, by_id[dpo["id"]]["replacement"])
    assert set(rebuilt_dpo["source_sessions"]) == {"fg-bob", "fg-carl"}
    assert rebuilt_dpo["created_from"] == {
        "seed": 3,
        "max_pairs_per_context": 4,
        "selection": "margin",
        "margin_share": 1.0,
    }
    assert dataset_withdrawal(store, unrelated["id"]) is None and store.exists(Bucket.DATASETS, unrelated["key"])

    weights = store.get_json(Bucket.DATASETS, "user_weights/test.json")
    assert set(weights["users"]) == {"bob", "carl"} and weights["withdrawn_users"] == 1

    audit = store.get_json(Bucket.SESSIONS, result["audit_key"])
    assert result["audit_key"].startswith(DELETION_AUDIT_PREFIX)
    assert audit["service"] == "labeler" and audit["session_ids"] == ["fg-alice"] and audit["requested_by"] == "p-alice"
    assert audit["removed"]["labels"] == 1 and "driving" not in json.dumps(audit)

    # Idempotent: nothing more to remove, the same replacements.
    again = jobs.forget_sessions(runtime, ["fg-alice"], ["alice"])
    assert again["labels"] == 0 and again["user_weight_entries"] == 0
    assert {d["id"]: d["replacement"] for d in again["datasets"]} == {k: v["replacement"] for k, v in by_id.items()}


def test_nothing_is_labelled_or_built_for_a_deleted_session(runtime: jobs.Runtime) -> None:
    store = runtime.store
    store_session(store, "fg-dora", "dora", "Oh no. How are you holding up?", HAPPY)
    store_session(store, "fg-ed", "ed", "That must sting. Want to talk it through?", HAPPY)
    write_tombstone(store, "fg-dora")  # Chat deleted it; its record is still here in this test.
    with pytest.raises(NotFound, match="deleted"):
        jobs.label_session(runtime, "fg-dora")
    assert store.list_keys(Bucket.SESSIONS, "fg-dora/labels/") == []
    built = jobs.build_sft_dataset(runtime, ["fg-dora", "fg-ed"])
    assert built["source_sessions"] == ["fg-ed"]


def test_a_capped_feedback_dataset_is_rebuilt_with_its_cap(runtime: jobs.Runtime) -> None:
    store = runtime.store
    mildly_happy = {**NEUTRAL, "happy": 0.45, "neutral": 0.45}
    mildly_sad = {**NEUTRAL, "sad": 0.4, "neutral": 0.5}
    # Two liked, two not: 4 possible pairs; a and b reacted the most, so their pair has the widest margin.
    replies = {"cap-a": HAPPY, "cap-b": SAD, "cap-c": mildly_happy, "cap-d": mildly_sad}
    for session_id, reaction in replies.items():
        store_session(store, session_id, session_id, f"Reply of {session_id}.", reaction)
        jobs.label_session(runtime, session_id)
    uncapped = jobs.build_dpo_dataset(runtime, "feedback", list(replies), seed=1)
    capped = jobs.build_dpo_dataset(runtime, "feedback", list(replies), seed=1, max_pairs_per_context=1)
    assert uncapped["counts"]["pairs"] == 4 and capped["counts"]["pairs"] == 1
    assert capped["created_from"] == {"seed": 1, "max_pairs_per_context": 1, "selection": "margin", "margin_share": 1.0}
    with pytest.raises(InvalidInput, match="max_pairs_per_context"):
        jobs.build_dpo_dataset(runtime, "feedback", list(replies), max_pairs_per_context=0)
    with pytest.raises(InvalidInput, match="margin, random"):
        jobs.build_dpo_dataset(runtime, "feedback", list(replies), selection="best")
    # A pipeline's config sets the cap of its datasets step.
    config = PipelineConfig(dpo_source="feedback", pairs_per_context=1)
    state = {"config": config.model_dump(), "train_sessions": list(replies), "steps": {}}
    assert pipeline_steps.datasets(runtime, state)["dpo"]["id"] == capped["id"]  # type: ignore[arg-type]

    # A rebuild (after a withdrawal, from the sessions left) keeps the dataset's cap: from all four sessions again
    # it draws the same single pair, so the same dataset.
    assert jobs._rebuild(runtime, capped, list(replies)) == (capped["id"], "rebuilt without the withdrawn sessions")
    pair = store.get_bytes(Bucket.DATASETS, capped["key"]).decode()
    assert "Reply of cap-a." in pair and "Reply of cap-b." in pair  # The widest margin.

    # ... and its selection rule; a manifest from before selections existed was drawn at random. (A seed whose
    # random draw is another pair than the widest, so the two rules cannot rebuild the same dataset.)
    def random_draw(seed: int) -> dict[str, Any]:
        return jobs.build_dpo_dataset(
            runtime, "feedback", list(replies), seed=seed, max_pairs_per_context=1, selection="random"
        )

    drawn = next(d for d in map(random_draw, range(20)) if d["content_hash"] != capped["content_hash"])
    seed = drawn["created_from"]["seed"]
    older = {**drawn, "created_from": {"seed": seed, "max_pairs_per_context": 1}}
    assert jobs._rebuild(runtime, older, list(replies))[0] == drawn["id"]
    # ... and its margin share: the widest half of the 4 combinations, again.
    half = jobs.build_dpo_dataset(runtime, "feedback", list(replies), seed=1, margin_share=0.5)
    assert half["counts"]["pairs"] == 2 and jobs._rebuild(runtime, half, list(replies))[0] == half["id"]
    with pytest.raises(InvalidInput, match="margin_share"):
        jobs.build_dpo_dataset(runtime, "feedback", list(replies), margin_share=0.0)


def test_an_sft_dataset_with_a_delta_share_is_rebuilt_with_the_same_share(runtime: jobs.Runtime) -> None:
    store = runtime.store
    faces = {"ds-ann": HAPPY, "ds-ben": HAPPY, "ds-cat": MILD}
    for session_id, face in faces.items():
        store_session(store, session_id, session_id.removeprefix("ds-"), "That must sting. Want to talk?", face)
    sessions = list(faces)
    labels = {s: jobs.label_session(runtime, s)["turns"][0] for s in sessions}
    assert all(turn["flagged"] is True for turn in labels.values())
    assert labels["ds-ann"]["delta"] == labels["ds-ben"]["delta"] > labels["ds-cat"]["delta"]
    every = jobs.build_sft_dataset(runtime, sessions)
    assert every["counts"]["flagged_turns"] == 3 and every["created_from"] == {}
    half = jobs.build_sft_dataset(runtime, sessions, delta_share=0.5)  # ceil(0.5 x 3) = 2: the two happiest.
    assert half["source_sessions"] == ["ds-ann", "ds-ben"] and half["created_from"] == {"delta_share": 0.5}
    with pytest.raises(InvalidInput, match="delta_share"):
        jobs.build_sft_dataset(runtime, sessions, delta_share=0.0)
    with pytest.raises(InvalidInput, match="EmpatheticDialogues"):
        jobs.build_sft_dataset(runtime, source="empathetic", delta_share=0.5)

    result = jobs.forget_sessions(runtime, ["ds-ann"], ["ann"], requested_by="p-ann", reason="withdrawal")

    replacements = {d["id"]: d["replacement"] for d in result["datasets"]}
    assert dataset_manifest(store, replacements[every["id"]])["source_sessions"] == ["ds-ben", "ds-cat"]
    rebuilt = dataset_manifest(store, replacements[half["id"]])
    # The same share of what is left: ceil(0.5 x 2) = 1.
    assert rebuilt["source_sessions"] == ["ds-ben"] and rebuilt["created_from"] == {"delta_share": 0.5}


def test_datasets_with_trimmed_cut_replies_say_so_and_are_rebuilt_with_the_rule(runtime: jobs.Runtime) -> None:
    store = runtime.store
    replies = {
        "tr-liked-cut": ("That must sting. I keep wondering whether the examiner", HAPPY),
        "tr-disliked": ("Oh well, there is always next time.", SAD),
    }
    for session_id, (reply, face) in replies.items():
        store_session(store, session_id, session_id, reply, face, at_limit=session_id.endswith("-cut"))
        jobs.label_session(runtime, session_id)
    sessions = list(replies)
    with pytest.raises(NotFound):
        jobs.build_dpo_dataset(runtime, "feedback", sessions)  # The only liked reply is cut: never chosen as it is.
    pairs = jobs.build_dpo_dataset(runtime, "feedback", sessions, cut_replies="trimmed")
    sft = jobs.build_sft_dataset(runtime, sessions, cut_replies="trimmed")
    assert pairs["created_from"]["cut_replies"] == "trimmed" and sft["created_from"] == {"cut_replies": "trimmed"}
    pair = json.loads(store.get_bytes(Bucket.DATASETS, pairs["key"]))
    assert (pair["chosen"], pair["rejected"]) == ("That must sting.", "Oh well, there is always next time.")
    assert "That must sting." in store.get_bytes(Bucket.DATASETS, sft["key"]).decode()
    with pytest.raises(InvalidInput, match="cut_replies"):
        jobs.build_sft_dataset(runtime, sessions, cut_replies="kept")
    # A pipeline's config sets the rule; a rebuild keeps it.
    config = PipelineConfig(dpo_source="feedback", cut_replies="trimmed")
    state = {"config": config.model_dump(), "train_sessions": sessions, "steps": {}}
    built = pipeline_steps.datasets(runtime, state)  # type: ignore[arg-type]
    assert (built["sft"]["id"], built["dpo"]["id"]) == (sft["id"], pairs["id"])
    assert jobs._rebuild(runtime, pairs, sessions)[0] == pairs["id"]
    assert jobs._rebuild(runtime, sft, sessions)[0] == sft["id"]
