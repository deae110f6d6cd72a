"""Training on several GPUs: the run's training launched with ``accelerate launch``, one process per GPU.

The worker process keeps what must exist once per run (the run lock, the record, checkpoint uploads, the
registry); the launched processes only train. They talk through the run's work folder:

* ``job.json`` and ``records.jsonl``: what to train (written by the worker before launching);
* ``progress.jsonl``: one :class:`~emili_trainer.training.Progress` per line (written by rank 0);
* ``saved-<step>``: written by rank 0 after checkpoint ``checkpoint-<step>`` is complete;
* ``CANCEL``: written by the worker when the run is cancelled; every rank stops after its current step;
* ``result.json``: written by rank 0 at the end.

The launched processes die with the worker (parent-death signal), so a killed worker leaves no orphans
training a run that a redelivered job resumes elsewhere.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState

from emili_core.errors import FailedPrecondition
from emili_trainer.recipes import Recipe
from emili_trainer.training import (
    OnSave,
    Progress,
    ProgressReporter,
    TrainResult,
    load_base_model,
    train_dpo,
    train_sft,
)

JOB, RECORDS, PROGRESS, CANCEL, RESULT = "job.json", "records.jsonl", "progress.jsonl", "CANCEL", "result.json"


def _die_with_parent() -> None:
    # Linux prctl(PR_SET_PDEATHSIG, SIGKILL): the kernel kills this child when the worker dies.
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


def launch(
    recipe: Recipe,
    records: Sequence[Mapping[str, Any]],
    work_dir: Path,
    *,
    num_processes: int,
    artifacts_dir: Path,
    cache_root: Path | None,
    resume_from: Path | None = None,
    init_adapter: Path | None = None,
    progress: Callable[[Progress], None] = lambda p: None,
    on_checkpoint: Callable[[Path, int], None] = lambda folder, step: None,
    should_stop: Callable[[], bool] = lambda: False,
    poll_seconds: float = 1.0,
    cpu: bool = False,
) -> TrainResult:
    """Train in ``num_processes`` launched processes and follow them; returns rank 0's result."""
    work_dir.mkdir(parents=True, exist_ok=True)
    job = {
        "recipe": recipe.to_dict(),
        "artifacts_dir": str(artifacts_dir),
        "cache_root": str(cache_root) if cache_root else None,
        "resume_from": str(resume_from) if resume_from else None,
        "init_adapter": str(init_adapter) if init_adapter else None,
    }
    (work_dir / JOB).write_text(json.dumps(job))
    (work_dir / RECORDS).write_text("".join(json.dumps(r) + "\n" for r in records))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes)]
    command += ["--cpu"] if cpu else (["--multi_gpu"] if num_processes > 1 else [])
    command += ["-m", "emili_trainer.distributed", str(work_dir)]
    log = (work_dir / "launch.log").open("ab")
    child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
    seen_lines, uploaded = 0, set()
    while True:
        finished = child.poll() is not None
        lines = (work_dir / PROGRESS).read_text().splitlines() if (work_dir / PROGRESS).exists() else []
        for line in lines[seen_lines:]:
            progress(Progress(**json.loads(line)))
        seen_lines = len(lines)
        for marker in sorted(work_dir.glob("saved-*"), key=lambda p: int(p.name.split("-")[1])):
            step = int(marker.name.split("-")[1])
            if step not in uploaded:
                on_checkpoint(work_dir / f"checkpoint-{step}", step)
                uploaded.add(step)
        if finished:
            break
        if should_stop() and not (work_dir / CANCEL).exists():
            (work_dir / CANCEL).touch()
        time.sleep(poll_seconds)
    log.close()
    if child.returncode != 0 or not (work_dir / RESULT).exists():
        tail = (work_dir / "launch.log").read_text(errors="replace")[-2000:]
        raise FailedPrecondition(f"distributed training exited with {child.returncode}: {tail}")
    result = json.loads((work_dir / RESULT).read_text())
    return TrainResult(**{**result, "adapter_dir": Path(result["adapter_dir"])})


class _ProgressFile(TrainerCallback):
    def __init__(self, path: Path) -> None:
        self.reporter = ProgressReporter(self._write)
        self.path = path

    def _write(self, progress: Progress) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(progress.__dict__) + "\n")

    def on_train_begin(self, args: Any, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self.reporter.on_train_begin(args, state, control, **kw)

    def on_log(self, args: Any, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self.reporter.on_log(args, state, control, **kw)


def main(work_dir: Path) -> None:
    """One launched process: train what ``job.json`` names; rank 0 reports and writes the result."""
    job = json.loads((work_dir / JOB).read_text())
    records = [json.loads(line) for line in (work_dir / RECORDS).read_text().splitlines() if line]
    recipe = Recipe(**job["recipe"])
    rank0 = int(os.environ.get("RANK", "0")) == 0
    callbacks: list[TrainerCallback] = []
    if rank0:
        callbacks = [
            _ProgressFile(work_dir / PROGRESS),
            OnSave(lambda folder, step: (work_dir / f"saved-{step}").touch()),
        ]
    tokenizer, model = load_base_model(
        recipe, Path(job["artifacts_dir"]), Path(job["cache_root"]) if job["cache_root"] else None
    )
    resume = Path(job["resume_from"]) if job["resume_from"] else None
    stop = lambda: (work_dir / CANCEL).exists()  # noqa: E731
    if recipe.kind == "sft":
        result = train_sft(
            recipe, tokenizer, model, records, work_dir, resume_from=resume, callbacks=callbacks, should_stop=stop
        )
    else:
        init = Path(job["init_adapter"]) if job["init_adapter"] else None
        result = train_dpo(
            recipe,
            tokenizer,
            model,
            records,
            work_dir,
            init_adapter=init,
            resume_from=resume,
            callbacks=callbacks,
            should_stop=stop,
        )
    if rank0:
        (work_dir / RESULT).write_text(json.dumps({**result.__dict__, "adapter_dir": str(result.adapter_dir)}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
