"""The pipeline's config, held-out split, ids and step bookkeeping (no servers: an in-memory object store)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from emili_core.errors import InvalidInput, NotFound
from emili_core.queues import TASK_ROUTES
from emili_pipeline.config import AUTO, PipelineConfig, Recipes, load_config, resolve
from emili_pipeline.describe import describe
from emili_pipeline.orchestrate import cancel, submit
from emili_pipeline.pipeline import (
    DONE,
    FAILED,
    STEPS,
    Superseded,
    candidate_version,
    config_of,
    evaluated_arms,
    first_unfinished,
    heldout_split,
    is_finished,
    load_state,
    model_arms,
    new_state,
    pipeline_id,
    run_step,
    state_lock,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SESSIONS = [f"s{i:02d}" for i in range(20)]
# What the trainer's GetRecipe would answer: shipped recipes' texts by name.
SHIPPED = {
    "smollm2-cpu-sft": "name: smollm2-cpu-sft\nkind: sft\nmodel: {path: m.gguf}\ntrain: {epochs: 1}\n",
    "smollm2-cpu-dpo": (
        "name: smollm2-cpu-dpo\nkind: dpo\nmodel: {path: m.gguf}\ntrain: {epochs: 3}\ndpo: {beta: 0.1}\n"
    ),
}


class MemoryStore:
    """The part of ObjectStore the pipeline state uses."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], Any] = {}

    def put_json(self, bucket: Any, key: str, value: Any) -> None:
        import json

        self.objects[(str(bucket), key)] = json.loads(json.dumps(value))

    def get_json(self, bucket: Any, key: str) -> Any:
        try:
            return self.objects[(str(bucket), key)]
        except KeyError:
            raise NotFound(key) from None


def test_heldout_split_is_deterministic_and_independent_of_order() -> None:
    train, heldout = heldout_split(SESSIONS, 0.25, seed=0)
    assert 2 <= len(heldout) <= 8 and sorted(train + heldout) == sorted(SESSIONS) and not set(train) & set(heldout)
    assert heldout_split(list(reversed(SESSIONS)), 0.25, seed=0) == (train, heldout)
    assert heldout_split(SESSIONS, 0.25, seed=1)[1] != heldout  # The seed picks another share.


def test_a_session_keeps_its_side_as_the_loops_sessions_grow() -> None:
    """The next candidate's baseline trained on the first sessions' training side: none of those may be held out
    to judge the two."""
    first = [f"s{i:03d}" for i in range(72)]
    grown = first + [f"s{i:03d}" for i in range(72, 144)]
    train_first, heldout_first = heldout_split(first, 0.25)
    train_grown, heldout_grown = heldout_split(grown, 0.25)
    assert set(train_first) <= set(train_grown) and set(heldout_first) <= set(heldout_grown)
    assert 0.15 < len(heldout_grown) / len(grown) < 0.35  # About the share asked for.


@pytest.mark.parametrize(
    ("ids", "share", "held"),
    [([], 0.25, 0), (["a"], 0.5, 0), (["a", "b"], 0.1, 1), (["a", "b"], 0.9, 1), (SESSIONS, 0.0, 0)],
)
def test_heldout_split_edges(ids: list[str], share: float, held: int) -> None:
    train, heldout = heldout_split(ids, share)
    assert len(heldout) == held and sorted(train + heldout) == sorted(ids)


def test_pipeline_id_names_config_and_sessions() -> None:
    config = PipelineConfig(users=4)
    assert pipeline_id(config, SESSIONS) == pipeline_id(config, list(reversed(SESSIONS)))
    assert pipeline_id(config, SESSIONS) != pipeline_id(config, SESSIONS[:-1])
    assert pipeline_id(config, SESSIONS) != pipeline_id(PipelineConfig(users=5), SESSIONS)
    assert pipeline_id(config, SESSIONS).startswith("pl-")


def test_shipped_configs_load_and_resolve_without_shared_data(tmp_path: Path) -> None:
    for name in ("demo.yaml", "ci.yaml"):
        config = load_config(CONFIGS / name)
        resolved = resolve(config, CONFIGS, shared=tmp_path / "no-shared")
        assert resolved.personas == "builtin" and resolved.faces is None
        assert "kind: sft" in resolved.recipes.sft and "kind: dpo" in resolved.recipes.dpo  # File text travels.
        assert resolved.recipes.dpo_epochs == 1
        assert resolved.simulator_settings().turns == config.simulator["turns"]
    assert load_config(CONFIGS / "demo.yaml").personas == AUTO


def test_resolve_uses_shared_data_when_present(tmp_path: Path) -> None:
    (tmp_path / "empatheticdialogues").mkdir()
    (tmp_path / "empatheticdialogues" / "valid.csv").write_text("conv_id\n")
    (tmp_path / "fer2013-publictest").mkdir()
    (tmp_path / "fer2013-publictest" / "fer2013_publictest_48x48.npz").write_bytes(b"")
    resolved = resolve(PipelineConfig(), CONFIGS, shared=tmp_path, fetch_recipe=SHIPPED.__getitem__)
    assert resolved.personas == f"ed:{tmp_path / 'empatheticdialogues'}"
    assert resolved.faces == str(tmp_path / "fer2013-publictest" / "fer2013_publictest_48x48.npz")


def test_resolve_fetches_shipped_recipes_and_records_the_dpo_epochs(tmp_path: Path) -> None:
    asked: list[str] = []

    def fetch(name: str) -> str:
        asked.append(name)
        return SHIPPED[name]

    resolved = resolve(PipelineConfig(), tmp_path, shared=tmp_path, fetch_recipe=fetch)
    assert asked == ["smollm2-cpu-sft", "smollm2-cpu-dpo"]
    assert (resolved.recipes.sft, resolved.recipes.dpo) == (SHIPPED["smollm2-cpu-sft"], SHIPPED["smollm2-cpu-dpo"])
    assert resolved.recipes.dpo_epochs == resolved.recipes.require_dpo_epochs() == 3
    # Resolving again changes nothing (text stays text) and needs no fetching: the pipeline id is stable.
    assert resolve(resolved, tmp_path, shared=tmp_path) == resolved
    assert pipeline_id(resolved, SESSIONS) != pipeline_id(PipelineConfig(), SESSIONS)


def test_resolve_refuses_what_it_cannot_turn_into_recipe_text(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="shipped recipe"):
        resolve(PipelineConfig(), tmp_path, shared=tmp_path)  # A shipped name, and no way to fetch it.
    no_epochs = SHIPPED["smollm2-cpu-dpo"].replace("train: {epochs: 3}\n", "")
    with pytest.raises(InvalidInput, match=r"sets no train\.epochs"):
        resolve(PipelineConfig(recipes=Recipes(dpo=no_epochs)), tmp_path, fetch_recipe=SHIPPED.__getitem__)
    zero = SHIPPED["smollm2-cpu-dpo"].replace("epochs: 3", "epochs: 0")
    with pytest.raises(InvalidInput, match=r"train\.epochs 0"):
        resolve(PipelineConfig(recipes=Recipes(dpo=zero)), tmp_path, fetch_recipe=SHIPPED.__getitem__)
    with pytest.raises(InvalidInput, match="not resolved"):
        PipelineConfig().recipes.require_dpo_epochs()


def test_bad_configs_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("users: 0\n")
    with pytest.raises(InvalidInput, match="users"):
        load_config(bad)
    bad.write_text("userz: 3\n")
    with pytest.raises(InvalidInput, match="userz"):
        load_config(bad)
    with pytest.raises(InvalidInput, match="not found"):
        resolve(PipelineConfig(recipes={"sft": "missing.yaml"}), tmp_path)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="simulator"):
        PipelineConfig(simulator={"turns": 0}).simulator_settings()


def test_every_step_task_is_routed() -> None:
    assert all(step.task in TASK_ROUTES for step in STEPS)
    assert [s.task.split(".")[0] for s in STEPS] == [
        "chat",
        "labeler",
        "labeler",
        "trainer",
        "trainer",
        "chat",
        "labeler",
        "trainer",
    ]


def test_run_step_records_outputs_and_skips_done_steps() -> None:
    store = MemoryStore()
    state = new_state(PipelineConfig(), SESSIONS)
    calls: list[str] = []

    def work(s: dict[str, Any]) -> dict[str, Any]:
        calls.append("collect")
        return {"sessions": len(s["sessions"]), "written": 20, "reused": 0, "missing": []}

    state = run_step(store, state, "collect", work, task_id="t1", worker="chat-1@h")  # type: ignore[arg-type]
    assert state["steps"]["collect"]["state"] == DONE and state["steps"]["collect"]["outputs"]["written"] == 20
    assert load_state(store, state["pipeline_id"])["steps"]["collect"]["state"] == DONE  # type: ignore[arg-type]
    run_step(store, state, "collect", work)  # type: ignore[arg-type]
    assert calls == ["collect"]  # Done steps are not run again.
    assert first_unfinished(state) == "label" and not is_finished(state)
    assert "20 sessions" in describe("collect", state["steps"]["collect"]["outputs"])


def test_a_failed_step_is_recorded_and_raised() -> None:
    store = MemoryStore()
    state = new_state(PipelineConfig(), SESSIONS)

    def fail(s: dict[str, Any]) -> dict[str, Any]:
        raise NotFound("no consenting session has a flagged assistant turn")

    with pytest.raises(NotFound):
        run_step(store, state, "datasets", fail)  # type: ignore[arg-type]
    stored = load_state(store, state["pipeline_id"])  # type: ignore[arg-type]
    assert stored["steps"]["datasets"]["state"] == FAILED and "flagged" in stored["steps"]["datasets"]["error"]


def test_an_older_submission_stops_when_a_newer_one_exists() -> None:
    store = MemoryStore()
    state = new_state(PipelineConfig(), SESSIONS)
    newer = {**state, "attempt": 2}
    store.put_json("models", f"pipelines/{state['pipeline_id']}/state.json", newer)
    with pytest.raises(Superseded):
        run_step(store, {**state, "attempt": 1}, "label", lambda s: {})  # type: ignore[arg-type]


@pytest.mark.parametrize("fails", [False, True])
def test_a_step_that_ends_after_its_pipeline_was_resubmitted_writes_nothing(fails: bool) -> None:
    store = MemoryStore()
    state = {**new_state(PipelineConfig(), SESSIONS), "attempt": 1}
    key = f"pipelines/{state['pipeline_id']}/state.json"

    def work(s: dict[str, Any]) -> dict[str, Any]:
        # Meanwhile the pipeline was resubmitted (or cancelled) by someone who thought this step's worker dead.
        store.put_json("models", key, {**load_state(store, s["pipeline_id"]), "attempt": 2})  # type: ignore[arg-type]
        if fails:
            raise NotFound("something")
        return {"written": 1}

    with pytest.raises(NotFound if fails else Superseded):
        run_step(store, state, "collect", work)  # type: ignore[arg-type]
    stored = store.get_json("models", key)
    assert stored["attempt"] == 2 and stored["steps"]["collect"]["state"] == "running"


def test_model_arms_follow_the_training_steps() -> None:
    state = new_state(PipelineConfig(), SESSIONS)
    assert model_arms(state) == {"base": "base"}
    state["steps"]["sft"] = {"state": DONE, "outputs": {"model_version": "sft-1"}}
    state["steps"]["dpo"] = {"state": DONE, "outputs": {"skipped": "no DPO dataset"}}
    assert model_arms(state) == {"base": "base", "sft": "sft-1"}


def test_the_baseline_arm_is_evaluated_and_the_candidate_is_the_last_version_trained() -> None:
    state = new_state(PipelineConfig(baseline="prod-7"), SESSIONS)
    assert model_arms(state) == {"base": "base", "baseline": "prod-7"} and candidate_version(state) is None
    state["steps"]["sft"] = {"state": DONE, "outputs": {"model_version": "sft-1"}}
    assert model_arms(state) == {"base": "base", "baseline": "prod-7", "sft": "sft-1"}
    assert candidate_version(state) == "sft-1"
    state["steps"]["dpo"] = {"state": DONE, "outputs": {"model_version": "dpo-1"}}
    assert candidate_version(state) == "dpo-1" and config_of(state).baseline == "prod-7"
    # A baseline that is one of the pipeline's own versions is not evaluated twice.
    same = new_state(PipelineConfig(baseline="sft-1"), SESSIONS)
    same["steps"]["sft"] = {"state": DONE, "outputs": {"model_version": "sft-1"}}
    assert model_arms(same) == {"base": "base", "sft": "sft-1"}


def test_the_default_baseline_keeps_existing_pipeline_ids(tmp_path: Path) -> None:
    config = PipelineConfig(users=4)
    assert config.baseline == "base" and "baseline" not in config.model_dump(mode="json")
    # A state written before the field existed reads back with the default.
    state = new_state(config, SESSIONS)
    assert "baseline" not in state["config"] and config_of(state).baseline == "base"
    other = PipelineConfig(users=4, baseline="prod-7")
    assert other.model_dump(mode="json")["baseline"] == "prod-7"
    assert pipeline_id(other, SESSIONS) != pipeline_id(config, SESSIONS)
    assert resolve(other, tmp_path, shared=tmp_path, fetch_recipe=SHIPPED.__getitem__).baseline == "prod-7"


@pytest.mark.parametrize("baseline", ["", "..", "a/b", "x" * 65, "prod 7"])
def test_a_baseline_that_names_no_arm_is_refused(tmp_path: Path, baseline: str) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"baseline: {baseline!r}\n")
    with pytest.raises(InvalidInput, match="baseline"):
        load_config(bad)


def test_a_loop_pipeline_evaluates_only_what_its_gate_compares() -> None:
    every = new_state(PipelineConfig(baseline="prod-7"), SESSIONS)
    gate_only = new_state(
        PipelineConfig.model_validate({"baseline": "prod-7", "evaluation": {"arms": "gate"}}), SESSIONS
    )
    for state in (every, gate_only):
        state["steps"]["sft"] = {"state": DONE, "outputs": {"model_version": "sft-1"}}
    assert evaluated_arms(every) == model_arms(every) == {"base": "base", "baseline": "prod-7", "sft": "sft-1"}
    assert evaluated_arms(gate_only) == {"baseline": "prod-7", "sft": "sft-1"}
    gate_only["steps"]["dpo"] = {"state": DONE, "outputs": {"model_version": "dpo-1"}}
    assert evaluated_arms(gate_only) == {"baseline": "prod-7", "dpo": "dpo-1"}
    on_base = new_state(PipelineConfig.model_validate({"evaluation": {"arms": "gate"}}), SESSIONS)
    on_base["steps"]["sft"] = {"state": DONE, "outputs": {"model_version": "sft-1"}}
    assert evaluated_arms(on_base) == {"base": "base", "sft": "sft-1"}
    # The default dumps as before the field existed: pipeline ids of existing configs do not change.
    assert "arms" not in every["config"]["evaluation"] and gate_only["config"]["evaluation"]["arms"] == "gate"


def test_pair_cap_selection_and_share_are_dumped_only_when_set() -> None:
    dumped = PipelineConfig().model_dump(mode="json")
    assert not {"pairs_per_context", "pair_selection", "pair_margin_share"} & set(dumped)  # Existing ids stay.
    assert PipelineConfig(pairs_per_context=12).model_dump(mode="json")["pairs_per_context"] == 12
    assert PipelineConfig(pair_selection="random").model_dump(mode="json")["pair_selection"] == "random"
    with pytest.raises(ValueError):
        PipelineConfig(pairs_per_context=0)
    assert PipelineConfig(pair_margin_share=0.25).model_dump(mode="json")["pair_margin_share"] == 0.25
    with pytest.raises(ValueError):
        PipelineConfig(pair_selection="best")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        PipelineConfig(pair_margin_share=0.0)


def test_a_cut_reply_rule_is_dumped_only_when_set() -> None:
    assert "cut_replies" not in PipelineConfig().model_dump(mode="json")  # Existing pipeline ids stay.
    assert PipelineConfig(cut_replies="trimmed").model_dump(mode="json")["cut_replies"] == "trimmed"
    with pytest.raises(ValueError):
        PipelineConfig(cut_replies="kept")  # type: ignore[arg-type]


def test_an_sft_delta_share_is_dumped_only_when_set_and_needs_session_sft() -> None:
    assert "sft_delta_share" not in PipelineConfig().model_dump(mode="json")  # Existing pipeline ids stay.
    assert PipelineConfig(sft_delta_share=0.5).model_dump(mode="json")["sft_delta_share"] == 0.5
    with pytest.raises(ValueError):
        PipelineConfig(sft_delta_share=0.0)
    with pytest.raises(ValueError, match="sft_source sessions"):
        PipelineConfig(sft_source="empathetic", sft_delta_share=0.5)


class SlowReadStore(MemoryStore):
    """Runs ``meanwhile`` in another thread at the first state read after ``armed`` is set, and gives it time to
    write before that read returns: a cancel landing between a step's last check and its write."""

    def __init__(self, meanwhile: Any) -> None:
        super().__init__()
        self.meanwhile = meanwhile
        self.armed = False
        self.thread: threading.Thread | None = None

    def get_json(self, bucket: Any, key: str) -> Any:
        value = super().get_json(bucket, key)
        if self.armed and self.thread is None:
            self.thread = threading.Thread(target=self.meanwhile)
            self.thread.start()
            time.sleep(0.5)
        return value


@pytest.mark.integration
def test_a_cancel_between_a_steps_last_check_and_its_write_is_kept(isolated_redis_url: str) -> None:
    app = Celery(broker=isolated_redis_url)
    state = {**new_state(PipelineConfig(), SESSIONS), "attempt": 1}
    store = SlowReadStore(lambda: cancel(app, store, state, "wrong sessions"))  # type: ignore[arg-type]
    store.put_json("models", f"pipelines/{state['pipeline_id']}/state.json", state)

    def work(s: dict[str, Any]) -> dict[str, Any]:
        store.armed = True
        return {"written": 20}

    run_step(store, state, "collect", work, lock=state_lock(app))  # type: ignore[arg-type]
    assert store.thread is not None
    store.thread.join(timeout=40)
    stored = load_state(store, state["pipeline_id"])  # type: ignore[arg-type]
    # The step wrote first (the cancel waited for the lock), then the cancel acted on what the step wrote.
    assert stored["cancelled"]["why"] == "wrong sessions" and stored["attempt"] == 2
    assert stored["steps"]["collect"]["state"] == DONE
    assert stored["steps"]["label"]["state"] == FAILED


@pytest.mark.integration
def test_a_submission_that_expects_an_attempt_stops_when_someone_acted_first(isolated_redis_url: str) -> None:
    app = Celery(broker=isolated_redis_url)
    store = MemoryStore()
    state = new_state(PipelineConfig(), SESSIONS)
    store.put_json("models", f"pipelines/{state['pipeline_id']}/state.json", {**state, "attempt": 1})
    with pytest.raises(Superseded):
        submit(app, store, state, expect_attempt=0)  # type: ignore[arg-type]
    assert load_state(store, state["pipeline_id"])["attempt"] == 1  # type: ignore[arg-type]
