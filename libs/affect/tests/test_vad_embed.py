"""Embedding cache (keys, hits and misses, the local folder) and the real MiniLM embedder when present."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from emili_affect.vad import (
    Embedder,
    EmbeddingCache,
    FixedEmbedder,
    Lexicon,
    LocalEmbeddingCache,
    MemoryEmbeddingCache,
    SentenceTransformerEmbedder,
    embedding_cache_key,
    lexicon_embeddings,
)
from emili_core.settings import REPO_ROOT

MINILM = REPO_ROOT / "var" / "artifacts" / "labeler" / "all-MiniLM-L6-v2"


def lexicon(*terms: str, sha256: str = "a" * 64) -> Lexicon:
    return Lexicon("tiny", "memory", sha256, tuple(terms), np.full((len(terms), 3), 0.5))


def test_cache_key_depends_on_lexicon_model_and_terms() -> None:
    key = embedding_cache_key("a" * 64, "m1", ["happy", "sad"])
    assert len(key) == 64 and key == embedding_cache_key("a" * 64, "m1", ["happy", "sad"])
    assert key != embedding_cache_key("b" * 64, "m1", ["happy", "sad"])
    assert key != embedding_cache_key("a" * 64, "m2", ["happy", "sad"])
    assert key != embedding_cache_key("a" * 64, "m1", ["happy"])
    assert key != embedding_cache_key("a" * 64, "m1", ["sad", "happy"])
    # Joining must not make different term lists collide.
    assert embedding_cache_key("a" * 64, "m", ["a b"]) != embedding_cache_key("a" * 64, "m", ["a", "b"])


def test_local_cache_miss_put_hit(tmp_path: Path) -> None:
    cache = LocalEmbeddingCache(tmp_path / "cache")
    assert isinstance(cache, EmbeddingCache)
    key = embedding_cache_key("a" * 64, "m", ["x"])
    assert cache.get(key) is None
    array = np.arange(12, dtype=np.float32).reshape(4, 3)
    cache.put(key, array)
    np.testing.assert_array_equal(cache.get(key), array)  # type: ignore[arg-type]
    assert (tmp_path / "cache" / key[:2] / f"{key}.npy").is_file()
    assert not list((tmp_path / "cache").rglob("*.tmp"))
    with pytest.raises(ValueError, match="hex"):
        cache.get("../escape")


def test_lexicon_embeddings_are_computed_once(tmp_path: Path) -> None:
    embedder = FixedEmbedder(dim=4)
    assert isinstance(embedder, Embedder)
    cache = MemoryEmbeddingCache()
    small = lexicon("happy", "sad", "altar boy")
    first = lexicon_embeddings(small, embedder, cache)
    assert first.shape == (3, 4) and first.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, rtol=1e-6)
    assert (cache.hits, cache.misses) == (0, 1)
    assert embedder.calls == [["happy", "sad", "altar boy"]]
    second = lexicon_embeddings(small, embedder, cache)
    np.testing.assert_array_equal(first, second)
    assert (cache.hits, cache.misses) == (1, 1)
    assert len(embedder.calls) == 1
    # Another file (digest) or another terms subset is another key: a miss.
    lexicon_embeddings(lexicon("happy", "sad", "altar boy", sha256="b" * 64), embedder, cache)
    lexicon_embeddings(small.subset([0, 1]), embedder, cache)
    assert (cache.hits, cache.misses) == (1, 3)
    # The folder cache survives the process: a new cache object over the same folder hits.
    folder = tmp_path / "emb"
    lexicon_embeddings(small, embedder, LocalEmbeddingCache(folder))
    calls = len(embedder.calls)
    np.testing.assert_array_equal(lexicon_embeddings(small, embedder, LocalEmbeddingCache(folder)), first)
    assert len(embedder.calls) == calls


def test_fixed_embedder_uses_given_vectors() -> None:
    embedder = FixedEmbedder({"x": [3.0, 4.0]}, model_id="test")
    np.testing.assert_allclose(embedder.embed(["x"]), [[0.6, 0.8]])
    assert embedder.model_id == "test"
    np.testing.assert_array_equal(embedder.embed(["y"]), embedder.embed(["y"]))


needs_minilm = pytest.mark.skipif(not (MINILM / "model.safetensors").is_file(), reason=f"{MINILM} is missing")


@pytest.fixture(scope="module")
def minilm() -> SentenceTransformerEmbedder:
    return SentenceTransformerEmbedder(MINILM)


@pytest.mark.slow
@needs_minilm
def test_minilm_similarities_make_sense(minilm: SentenceTransformerEmbedder) -> None:
    vectors = minilm.embed(["happy", "joyful", "table"])
    assert vectors.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    happy, joyful, table = vectors
    assert happy @ joyful > happy @ table + 0.2
    assert minilm.model_id.startswith("all-MiniLM-L6-v2@")


@pytest.mark.slow
@needs_minilm
def test_minilm_batching_does_not_change_embeddings(minilm: SentenceTransformerEmbedder) -> None:
    words = ["happy", "a very long multi word expression indeed", "😀", "日本語", "don't"]
    together = minilm.embed(words)
    alone = np.vstack([minilm.embed([w]) for w in words])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert minilm.embed([]).shape == (0, 384)
