"""Builds the labeler's runtime from settings: the lexicon, the embedder, the scorer, object storage."""

from __future__ import annotations

import io
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from emili_affect.vad import (
    SentenceTransformerEmbedder,
    VADScorer,
    english_lemmas,
    load_affect_tables,
    load_lexicon,
)
from emili_core.errors import NotFound
from emili_core.objectstore import Bucket, ObjectStore
from emili_labeler.jobs import Runtime
from emili_labeler.settings import LabelerSettings

log = logging.getLogger(__name__)


class ObjectStoreEmbeddingCache:
    """Lexicon embedding matrices in ``emili-cache/embeddings/<key>.npy``: computed once per lexicon and model."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    def get(self, key: str) -> npt.NDArray[Any] | None:
        try:
            data = self.store.get_bytes(Bucket.CACHE, f"embeddings/{key}.npy", max_bytes=512 * 1024 * 1024)
        except NotFound:
            return None
        return np.load(io.BytesIO(data), allow_pickle=False)  # type: ignore[no-any-return]

    def put(self, key: str, array: npt.NDArray[Any]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "embeddings.npy"
            np.save(path, array, allow_pickle=False)
            self.store.put_file(Bucket.CACHE, f"embeddings/{key}.npy", path)


def lexicon_path(settings: LabelerSettings, store: ObjectStore) -> Path:
    lexicon = settings.labeler.lexicon
    if lexicon.object_key:
        target = settings.artifacts_dir / "labeler" / "lexicons" / Path(lexicon.object_key).name
        if not target.exists():
            store.get_file(Bucket.DATASETS, lexicon.object_key, target)
        return target
    return settings.artifact(lexicon.path)


def build_runtime(settings: LabelerSettings) -> Runtime:
    store = ObjectStore(settings.s3)
    store.ensure_buckets()
    options = settings.labeler
    lexicon = load_lexicon(lexicon_path(settings, store), options.lexicon.format)
    oov = None if options.oov_method == "none" else options.oov_method
    embedder = SentenceTransformerEmbedder(settings.artifact(options.embedding_model)) if oov else None
    scorer = VADScorer(
        lexicon,
        embedder,
        oov=oov,
        cache=ObjectStoreEmbeddingCache(store),
        beta=options.beta,
        k=options.top_k,
        alpha=options.ridge_alpha,
        max_chars=options.max_text_chars,
        lemmas=english_lemmas if options.lemmatize else None,
        affect_tables=load_affect_tables([settings.artifact(p) for p in options.affect_resources])
        if oov == "fusion"
        else (),
    )
    scorer.warm()
    log.info("labeler ready: lexicon %s (%d terms), OOV method %s", lexicon.name, len(lexicon.terms), oov)
    return Runtime(settings, store, scorer)
