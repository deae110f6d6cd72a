"""The researchers' page and its evaluation-report API, against real Redis and S3 and reports written where the
trainer's evaluation runs write them (bucket models, runs/<eval id>/{run.json, report/...})."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient

from emili_core.objectstore import Bucket, ObjectStore
from emili_testing.plugin import token

from .conftest import admin_headers, bearer, create_study, join, register_model_version

pytestmark = pytest.mark.integration

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 64  # A PNG signature and enough bytes for several chunks.


def stat(mean: float) -> dict[str, Any]:
    return {"mean": mean, "ci95": [mean - 0.5, mean + 0.5]}


def write_eval(
    store: ObjectStore,
    arms: list[str],
    *,
    updated_ms: int,
    synthetic: bool | None = None,
    plots: tuple[str, ...] = ("table1.png", "table2.png"),
    record: bool = True,
) -> str:
    """An evaluation run as the trainer leaves it: run.json, report.json, report.md and PNG plots."""
    run_id = f"eval-{uuid.uuid4().hex[:16]}"
    prefix = f"runs/{run_id}"
    if record:
        run = {"run_id": run_id, "kind": "eval", "state": "succeeded", "arms": arms, "created_ms": updated_ms - 1000}
        run |= {"updated_ms": updated_ms, "report_prefix": f"{prefix}/report", "max_examples": 8}
        store.put_json(Bucket.MODELS, f"{prefix}/run.json", run)
    report: dict[str, Any] = {
        "title": f"EMILI evaluation {run_id}: {' vs '.join(arms)}",
        "ratings_table": {
            arm: {"n": 3, "empathy": stat(3.5), "relevance": stat(4.0), "fluency": stat(4.5)} for arm in arms
        },
        "delta_table": {
            "lexicon": "nrc_v1",
            "sessions": 6,
            "arms": {
                arm: {"n": 2, "valence": stat(0.1), "arousal": stat(-0.05), "dominance": stat(0.0)} for arm in arms
            },
        },
        "reply_metrics": {arm: {"n": 8, "bleu": 1.0} for arm in arms},
        "perplexity": {arm: 12.0 for arm in arms},
        "mmlu": {"skipped": "no local copy"},
    }
    if synthetic is not None:
        report["synthetic"] = synthetic
    store.put_json(Bucket.MODELS, f"{prefix}/report/report.json", report)
    store.put_bytes(Bucket.MODELS, f"{prefix}/report/report.md", b"# report\n")
    for name in plots:
        store.put_bytes(Bucket.MODELS, f"{prefix}/report/plots/{name}", PNG, content_type="image/png")
    return run_id


def versions(store: ObjectStore, *names: str) -> list[str]:
    made = [f"{name}-{uuid.uuid4().hex[:8]}" for name in names]
    for version in made:
        register_model_version(store, version)
    return made


def test_newest_report_covering_the_study_arms(client: TestClient, object_store: ObjectStore) -> None:
    sft, dpo = versions(object_store, "sft", "dpo")
    now = int(time.time() * 1000)
    older = write_eval(object_store, ["base", sft], updated_ms=now - 60_000)
    newest = write_eval(object_store, ["base", sft, dpo], updated_ms=now, synthetic=True)
    write_eval(object_store, ["base", dpo], updated_ms=now + 60_000)  # Newer, but without the study's sft arm.
    write_eval(object_store, ["base", sft], updated_ms=now + 120_000, record=False)  # No run record: no time.
    study = create_study(client, arms=[{"arm": "base"}, {"arm": sft}])
    sid = study["study_id"]

    response = client.get(f"/api/v1/studies/{sid}/report", headers=admin_headers())
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["run_id"] == newest != older
    assert body["study_id"] == sid and body["study_arms"] == ["base", sft] and body["arms"] == ["base", sft, dpo]
    assert body["synthetic"] is True and body["updated_ms"] == now and body["title"].startswith("EMILI evaluation")
    assert body["ratings_table"][sft]["empathy"] == stat(3.5) and body["ratings_table"]["base"]["n"] == 3
    assert body["delta_table"]["lexicon"] == "nrc_v1" and body["delta_table"]["arms"][dpo]["valence"] == stat(0.1)
    assert [p["name"] for p in body["plots"]] == ["table1.png", "table2.png"]
    assert body["plots"][0]["title"].startswith("Table 1")

    plot = client.get(body["plots"][0]["url"], headers=admin_headers())
    assert plot.status_code == 200 and plot.headers["content-type"] == "image/png" and plot.content == PNG

    # Plots exist only under a report of the study's arms, and only by their listed names.
    base_url = f"/api/v1/studies/{sid}/reports"
    missing = client.get(f"{base_url}/{newest}/plots/reply_metrics.png", headers=admin_headers())
    assert missing.status_code == 404 and "no plot" in missing.json()["detail"]
    other = write_eval(object_store, ["base", dpo], updated_ms=now)
    assert client.get(f"{base_url}/{other}/plots/table1.png", headers=admin_headers()).status_code == 404
    assert client.get(f"{base_url}/{newest}/plots/..%2Frun.json", headers=admin_headers()).status_code == 404
    assert client.get(f"{base_url}/not-an-eval/plots/table1.png", headers=admin_headers()).status_code == 404


def test_report_without_synthetic_flag_and_from_a_report_without_run_record(
    client: TestClient, object_store: ObjectStore
) -> None:
    (sft,) = versions(object_store, "sft")
    run_id = write_eval(object_store, ["base", sft], updated_ms=0, record=False, plots=())
    study = create_study(client, arms=[{"arm": sft}])
    body = client.get(f"/api/v1/studies/{study['study_id']}/report", headers=admin_headers()).json()
    assert body["run_id"] == run_id and body["arms"] == sorted(["base", sft]) and body["synthetic"] is None
    assert body["plots"] == [] and body["created_ms"] == 0


def test_no_report_for_the_study_arms_is_a_clear_404(client: TestClient, object_store: ObjectStore) -> None:
    sft, untested = versions(object_store, "sft", "untested")
    write_eval(object_store, ["base", sft], updated_ms=int(time.time() * 1000))
    study = create_study(client, arms=[{"arm": "base"}, {"arm": untested}])
    response = client.get(f"/api/v1/studies/{study['study_id']}/report", headers=admin_headers())
    assert response.status_code == 404, response.text
    body = response.json()
    assert body["error"] == "not_found"
    assert "no evaluation report covers this study's arms" in body["detail"] and untested in body["detail"]
    unknown = client.get("/api/v1/studies/st-000000000000/report", headers=admin_headers())
    assert unknown.status_code == 404 and "does not exist" in unknown.json()["detail"]


def test_reports_are_for_admins_only(client: TestClient, object_store: ObjectStore) -> None:
    (sft,) = versions(object_store, "sft")
    run_id = write_eval(object_store, ["base", sft], updated_ms=int(time.time() * 1000))
    study = create_study(client, arms=[{"arm": "base"}, {"arm": sft}])
    sid = study["study_id"]
    participant = join(client, sid)
    chat_user = bearer(token(["chat"], "someone"))
    for path in (f"/api/v1/studies/{sid}/report", f"/api/v1/studies/{sid}/reports/{run_id}/plots/table1.png"):
        for headers in (participant.headers, chat_user):
            response = client.get(path, headers=headers)
            assert response.status_code == 403, response.text
            assert response.json()["error"] == "permission_denied"
        assert client.get(path).status_code == 401


def test_researcher_page_is_served(client: TestClient) -> None:
    page = client.get("/researcher")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for element in ('id="admin-token"', 'id="token-use"', 'id="studies"', 'id="study-template"'):
        assert element in page.text
    for part in (
        "progress-table",
        "canary-table",
        "report-synthetic",
        "report-tables",
        "report-plots",
        'data-format="csv"',
    ):
        assert part in page.text
    script = client.get("/static/researcher.js")
    assert script.status_code == 200 and "sessionStorage" in script.text and "/report" in script.text
    assert "/canary" in script.text
    assert client.get("/static/researcher.css").status_code == 200
