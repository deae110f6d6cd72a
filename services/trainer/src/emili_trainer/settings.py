"""The trainer service's one settings class. Environment: ``EMILI_TRAINER__<FIELD>`` (and the common ``EMILI_*``)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, Field

from emili_core.settings import REPO_ROOT, CommonSettings, ServerSettings, WorkerSettings


class TrainerServerSettings(ServerSettings):
    grpc_port: int = Field(50054, ge=0, le=65535)
    metrics_port: int = Field(9104, ge=0, le=65535)


class TrainerWorkerSettings(WorkerSettings):
    # One run at a time per worker: a run owns the machine's accelerator (or its cores).
    concurrency: int = Field(1, ge=1, le=1)
    metrics_port: int = Field(9114, ge=0, le=65535)


class TrainerOptions(BaseModel):
    server: TrainerServerSettings = TrainerServerSettings()
    worker: TrainerWorkerSettings = TrainerWorkerSettings()
    # Local scratch space for runs: checkpoints are written here, then copied to object storage.
    work_dir: Path = REPO_ROOT / "var" / "trainer"
    # The run lock's time to live; a heartbeat renews it. A dead worker's run is free again after this long.
    # Where a GGUF base model is dequantised to (once); default: beside the GGUF file in the artifacts folder.
    model_cache_dir: Path | None = None
    lock_ttl_seconds: float = Field(60.0, gt=1.0)
    torch_threads: int | None = Field(None, ge=1)
    # Processes per run, launched with `accelerate launch` (one per GPU). 0: one per visible CUDA device when
    # there are several, else train inside the worker. A number forces that many (on CPU without CUDA).
    launch_processes: int = Field(0, ge=0)
    # Evaluation: EmpatheticDialogues CSV folder (test.csv is used), and a local MMLU copy for lm-eval.
    empathetic_dialogues: Path | None = None
    mmlu_path: Path | None = None
    eval_max_new_tokens: int = Field(60, ge=1, le=1024)
    # Defaults of every evaluation run (a run may override them): all EmpatheticDialogues test dialogues (2,547)
    # instead of max_examples; sampling seeds (empty: one greedy pass), with the paired bootstrap's resamples;
    # pooling synthetic (simulated) with real sessions, which reports otherwise keep apart.
    eval_empathetic_full: bool = False
    eval_seeds: list[int] = Field(default_factory=list)
    eval_temperature: float = Field(0.7, gt=0.0)
    eval_top_p: float = Field(0.9, gt=0.0, le=1.0)
    eval_bootstrap_samples: int = Field(1000, ge=100)
    eval_pool_synthetic: bool = False
    # A subset of MMLU subjects (demo runs; None: all 57). Its accuracy is not MMLU's full figure.
    mmlu_subjects: list[str] | None = None
    embedding_model: Path = Path("labeler/all-MiniLM-L6-v2")
    vad_lexicon: Path = Path("labeler/NoVAD_v2013.csv")
    # Reply metrics as EmPO computes them; relative paths are under the artefacts folder. The NRC lexicons and
    # the EmpatheticDialogues counts may not be redistributed, so they are read where the user keeps them.
    # EmPO's ED train+valid document counts for NIDF (JSON with "word_counts"); unset: counts over the rows scored.
    ed_counts: Path | None = None
    # VAD lexicon of the word-choice distances (EmPO: NRC VAD v1); unset: vad_lexicon.
    distance_lexicon: Path | None = None
    intensity_lexicon: Path | None = None  # NRC Emotion Intensity Lexicon (TSV); unset: no intensity distance.
    epitome_dir: Path = Path("trainer/epitome")  # Written by `emili eval train-epitome`.
    bertscore: bool = True  # With the embedding model's encoder (not comparable with published BERTScore).
    bertscore_layers: int = Field(6, ge=1)


class TrainerSettings(CommonSettings):
    service_name: ClassVar[str] = "trainer"
    # A run can take hours; the broker must not hand its message to another worker meanwhile.
    task_time_limit_seconds: int = Field(12 * 3600, ge=1)
    visibility_timeout_seconds: int = Field(13 * 3600, ge=2)
    trainer: TrainerOptions = TrainerOptions()
