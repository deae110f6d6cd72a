"""The labeler's one settings class. Environment: ``EMILI_LABELER__<FIELD>`` (and the common ``EMILI_*``)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, Field

from emili_core.settings import CommonSettings, ServerSettings, WorkerSettings


class LabelerServerSettings(ServerSettings):
    grpc_port: int = Field(50053, ge=0, le=65535)
    metrics_port: int = Field(9103, ge=0, le=65535)


class LabelerWorkerSettings(WorkerSettings):
    metrics_port: int = Field(9113, ge=0, le=65535)


class LexiconSettings(BaseModel):
    """Which VAD lexicon: a path (relative to EMILI_ARTIFACTS_DIR unless absolute) or an object key."""

    format: Literal["warriner", "nrc_v1", "nrc_v2"] = "warriner"
    path: Path = Path("labeler/NoVAD_v2013.csv")
    object_key: str = ""  # Bucket "datasets"; when set, downloaded to the cache and used instead of path.


class LabelerOptions(BaseModel):
    server: LabelerServerSettings = LabelerServerSettings()
    worker: LabelerWorkerSettings = LabelerWorkerSettings()
    lexicon: LexiconSettings = LexiconSettings()
    embedding_model: Path = Path("labeler/all-MiniLM-L6-v2")
    oov_method: Literal["softmax", "topk", "ridge", "fusion", "none"] = "softmax"
    # Independent affect lexicons read by the "fusion" method: files, or folders of them (missing ones skipped).
    affect_resources: list[Path] = [Path("labeler/NoVAD_v2013.csv"), Path("labeler/affect")]
    beta: float = Field(10.0, gt=0)  # Softmax sharpness of the paper's out-of-lexicon method.
    # A word the lexicon lacks is looked up by its lemma before the OOV estimate: Warriner's norms rate lemmas only,
    # so without this "better" and "worse" (the words of a post-chat survey) score near the lexicon's average.
    lemmatize: bool = True
    top_k: int = Field(10, ge=1)
    ridge_alpha: float = Field(1.0, gt=0)
    max_text_chars: int = Field(100_000, ge=1)
    max_batch_texts: int = Field(10_000, ge=1)
    # "learned": each user's fitted weights (labeler.fit_user_weights), else the population's. "variant_2025" is
    # the 2025 code's flag on plain 0-1 scores; "variant_2025_zscored" is EMILI's z-scored extension of it.
    weights: Literal["emotion_tune", "variant_2025", "variant_2025_zscored", "learned"] = "emotion_tune"
    bootstrap_samples: int = Field(2000, ge=100)
    # What of a survey the gold labels score: its free text, its ticked (current) feelings, or both together.
    gold_text_source: Literal["free_text", "feelings", "both"] = "both"
    empathetic_dialogues: Path | None = None  # EmpatheticDialogues CSV folder; development data lives in ../shared.


class LabelerSettings(CommonSettings):
    service_name: ClassVar[str] = "labeler"
    labeler: LabelerOptions = LabelerOptions()
