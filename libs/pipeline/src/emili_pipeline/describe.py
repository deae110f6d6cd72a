"""One line about each finished step's outputs, for ``emili pipeline run|status`` (producer side only)."""

from __future__ import annotations

import json
from typing import Any


def describe(name: str, result: dict[str, Any]) -> str:
    """One line about a finished step's outputs, for the live status table."""
    if result.get("skipped"):
        return f"skipped: {result['skipped']}"
    if name == "collect":
        return f"{result['sessions']} sessions ({result['written']} written, {result['reused']} already stored)"
    if name == "label":
        return f"{result['labelled']} labelled, {result['flagged_turns']}/{result['assistant_turns']} turns flagged"
    if name == "datasets":
        parts = [
            f"{k} {v['id'][:12]} ({v.get('counts', {}).get('examples', '?')} examples)"
            for k, v in result.items()
            if isinstance(v, dict)
        ]
        return "; ".join(parts + result.get("notes", [])) or "none"
    if name in ("sft", "dpo"):
        m = result.get("metrics") or {}
        loss = m.get("train_loss")
        return (
            f"{result['model_version']}: {m.get('steps')} steps, loss {loss:.3f}" if loss else result["model_version"]
        )
    if name == "arm_sessions":
        return ", ".join(f"{arm}: {len(ids)}" for arm, ids in result.get("arms", {}).items()) or "none"
    if name == "delta_table":
        return f"{result['table']['sessions']} sessions, arms {', '.join(result['table']['arms'])}"
    if name == "evaluate":
        return f"report in {result['report_prefix']}"
    return json.dumps(result)[:100]
