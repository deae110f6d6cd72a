"""Training launched with `accelerate launch` (the multi-GPU path), run here on CPU processes: progress,
checkpoints and the result come back to the worker through the work folder; rank 0 alone writes them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from emili_trainer import distributed
from emili_trainer.recipes import Recipe
from emili_trainer.training import Progress

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("processes", [1, 2])
def test_launched_training_reports_back(
    processes: int,
    conversation: list[dict[str, Any]],
    make_recipe: Callable[..., Recipe],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    reports: list[Progress] = []
    checkpoints: list[int] = []
    result = distributed.launch(
        make_recipe("smollm2-cpu-sft", max_steps=4, save_steps=2),
        [{"id": f"s{i}", "messages": conversation} for i in range(8)],
        tmp_path,
        num_processes=processes,
        artifacts_dir=tmp_path,
        cache_root=None,
        progress=reports.append,
        on_checkpoint=lambda folder, step: checkpoints.append(step) if folder.is_dir() else None,
        poll_seconds=0.2,
        cpu=True,
    )
    assert result.steps == 4 and not result.cancelled
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    assert checkpoints == [2, 4]
    assert [r.step for r in reports if r.loss is not None] == [1, 2, 3, 4]  # Rank 0 only: no duplicates.


def test_a_failing_launch_says_why(make_recipe: Callable[..., Recipe], tmp_path: Path) -> None:
    with pytest.raises(Exception, match="distributed training exited"):
        distributed.launch(
            make_recipe("smollm2-cpu-sft", max_steps=2),
            [{"id": "bad", "messages": "not a list"}],
            tmp_path,
            num_processes=1,
            artifacts_dir=tmp_path,
            cache_root=None,
            poll_seconds=0.2,
            cpu=True,
        )
