"""Word embeddings e(w) for the out-of-lexicon methods, and a cache for the lexicon's embedding matrix.

:class:`SentenceTransformerEmbedder` reproduces sentence-transformers' encode for a local model folder
(all-MiniLM-L6-v2) with plain transformers: the folder's ``modules.json`` names Transformer -> Pooling ->
Normalize, and ``1_Pooling/config.json`` selects mean pooling, so an embedding is the attention-masked mean
of the last hidden states, L2-normalised. Rows of every embedder's output have unit length, so a dot
product is a cosine similarity.

Embedding a 20k-term lexicon takes about half a minute on two CPU cores; :func:`lexicon_embeddings` does it
once per (lexicon, model, terms) and stores the matrix in an :class:`EmbeddingCache`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from emili_affect.vad.lexicon import Lexicon

__all__ = [
    "Embedder",
    "EmbeddingCache",
    "FixedEmbedder",
    "LocalEmbeddingCache",
    "MemoryEmbeddingCache",
    "SentenceTransformerEmbedder",
    "embedding_cache_key",
    "lexicon_embeddings",
]

Matrix = npt.NDArray[np.float32]


@runtime_checkable
class Embedder(Protocol):
    """Maps texts to unit-length float32 rows; ``model_id`` identifies the model in cache keys."""

    @property
    def model_id(self) -> str: ...

    def embed(self, texts: Sequence[str]) -> Matrix: ...


@runtime_checkable
class EmbeddingCache(Protocol):
    """Where computed embedding matrices are kept between processes (a folder, an object store)."""

    def get(self, key: str) -> npt.NDArray[Any] | None: ...

    def put(self, key: str, array: npt.NDArray[Any]) -> None: ...


def embedding_cache_key(lexicon_sha256: str, model_id: str, terms: Sequence[str]) -> str:
    """sha256 of (lexicon file digest, model id, the exact terms in order): any change gives a new key."""
    terms_digest = hashlib.sha256("\n".join(terms).encode("utf-8")).hexdigest()
    payload = json.dumps([lexicon_sha256, model_id, len(terms), terms_digest], separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class LocalEmbeddingCache:
    """``<root>/<key[:2]>/<key>.npy``; writes are atomic (temporary file, then rename)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        if not key or not all(c in "0123456789abcdef" for c in key):
            raise ValueError(f"cache keys are lowercase hex digests, got {key!r}")
        return self.root / key[:2] / f"{key}.npy"

    def get(self, key: str) -> npt.NDArray[Any] | None:
        path = self._path(key)
        try:
            # allow_pickle=False: a cache file must never be able to run code.
            array: npt.NDArray[Any] = np.load(path, allow_pickle=False)
            return array
        except FileNotFoundError:
            return None

    def put(self, key: str, array: npt.NDArray[Any]) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{key[:8]}-", suffix=".npy.tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, np.ascontiguousarray(array), allow_pickle=False)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class MemoryEmbeddingCache:
    """A process-local cache (tests, notebooks); counts hits and misses."""

    def __init__(self) -> None:
        self._arrays: dict[str, npt.NDArray[Any]] = {}
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> npt.NDArray[Any] | None:
        array = self._arrays.get(key)
        if array is None:
            self.misses += 1
            return None
        self.hits += 1
        return array.copy()

    def put(self, key: str, array: npt.NDArray[Any]) -> None:
        self._arrays[key] = np.array(array, copy=True)


def lexicon_embeddings(
    lexicon: Lexicon,
    embedder: Embedder,
    cache: EmbeddingCache | None = None,
) -> Matrix:
    """e(m_i) for every term of the lexicon, in its order, from the cache when there (else computed, stored)."""
    key = embedding_cache_key(lexicon.sha256, embedder.model_id, lexicon.terms)
    if cache is not None:
        cached = cache.get(key)
        if cached is not None and cached.ndim == 2 and cached.shape[0] == len(lexicon):
            return np.ascontiguousarray(cached, dtype=np.float32)
    matrix = np.ascontiguousarray(embedder.embed(lexicon.terms), dtype=np.float32)
    if matrix.shape[0] != len(lexicon):
        raise ValueError(f"embedder returned {matrix.shape[0]} rows for {len(lexicon)} terms")
    if cache is not None:
        cache.put(key, matrix)
    return matrix


class FixedEmbedder:
    """Given vectors for given texts, a seeded pseudo-random unit vector for any other (tests, offline runs).

    Vectors are L2-normalised like a real embedder's; every call's texts are recorded in ``calls``.
    """

    def __init__(
        self, vectors: Mapping[str, npt.ArrayLike] | None = None, dim: int | None = None, model_id: str = "fixed"
    ) -> None:
        given = {text: np.asarray(v, dtype=np.float64).ravel() for text, v in (vectors or {}).items()}
        dims = {v.size for v in given.values()}
        if len(dims) > 1 or (dim is not None and dims and dims != {dim}):
            raise ValueError(f"all vectors must have one dimension, got {sorted(dims)} (dim={dim})")
        if any(not np.linalg.norm(v) for v in given.values()):
            raise ValueError("vectors must not be zero")
        self.dim = dim if dim is not None else (dims.pop() if dims else 16)
        self._vectors = {text: (v / np.linalg.norm(v)).astype(np.float32) for text, v in given.items()}
        self._model_id = model_id
        self.calls: list[list[str]] = []

    @property
    def model_id(self) -> str:
        return self._model_id

    def vector(self, text: str) -> Matrix:
        fixed = self._vectors.get(text)
        if fixed is not None:
            return fixed
        seed = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")
        v = np.random.default_rng(seed).standard_normal(self.dim)
        return (v / np.linalg.norm(v)).astype(np.float32)

    def embed(self, texts: Sequence[str]) -> Matrix:
        self.calls.append(list(texts))
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            out[i] = self.vector(text)
        return out


def _folder_digest(folder: Path) -> str:
    """sha256 over the folder's files (names and bytes; README excluded), identifying the exact model."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        if relative.startswith(".") or relative.lower().startswith("readme"):
            continue
        digest.update(relative.encode("utf-8") + b"\0")
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


class SentenceTransformerEmbedder:
    """A local sentence-transformers folder run with transformers: mean pooling, L2 normalisation.

    Texts are embedded in batches sorted by length (less padding); the model is loaded on construction
    from local files only. Safe to call from several threads (torch releases the GIL; the tokenizer is
    guarded by a lock).
    """

    def __init__(
        self,
        folder: str | Path,
        batch_size: int = 256,
        device: str = "cpu",
        num_threads: int | None = None,
    ) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.folder = Path(folder)
        if not (self.folder / "config.json").is_file():
            raise FileNotFoundError(f"{self.folder} is not a transformers model folder (no config.json)")
        self._check_modules()
        config_path = self.folder / "sentence_bert_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self.max_length = int(config.get("max_seq_length", 256))
        self.do_lower_case = bool(config.get("do_lower_case", False))
        self.batch_size = batch_size
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self._torch = torch
        self._device = torch.device(device)
        self._tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
        self._model = AutoModel.from_pretrained(self.folder, local_files_only=True).to(self._device).eval()
        self._lock = threading.Lock()
        self._model_id = f"{self.folder.name}@{_folder_digest(self.folder)[:16]}"

    def _check_modules(self) -> None:
        """Refuse folders whose pipeline is not Transformer -> mean Pooling (-> Normalize)."""
        self.normalize = True
        modules_path = self.folder / "modules.json"
        if not modules_path.is_file():
            return
        modules = json.loads(modules_path.read_text())
        types = [m["type"].rsplit(".", 1)[-1] for m in modules]
        unsupported = [t for t in types if t not in {"Transformer", "Pooling", "Normalize"}]
        if unsupported:
            raise ValueError(f"{self.folder}: unsupported sentence-transformers modules {unsupported}")
        self.normalize = "Normalize" in types
        for module in modules:
            if module["type"].endswith("Pooling"):
                pooling = json.loads((self.folder / module["path"] / "config.json").read_text())
                if not pooling.get("pooling_mode_mean_tokens") or any(
                    v for k, v in pooling.items() if k.startswith("pooling_mode_") and k != "pooling_mode_mean_tokens"
                ):
                    raise ValueError(f"{self.folder}: only mean pooling is supported, got {pooling}")

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def dim(self) -> int:
        return int(self._model.config.hidden_size)

    def embed(self, texts: Sequence[str]) -> Matrix:
        torch = self._torch
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                rows = order[start : start + self.batch_size]
                # Stripped (and lowercased when the model asks for it) as sentence-transformers does.
                batch = [texts[i].strip().lower() if self.do_lower_case else texts[i].strip() for i in rows]
                with self._lock:
                    encoded = self._tokenizer(
                        batch, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
                    )
                encoded = {k: v.to(self._device) for k, v in encoded.items()}
                hidden = self._model(**encoded).last_hidden_state
                mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                if self.normalize:
                    pooled = torch.nn.functional.normalize(pooled, p=2.0, dim=1)
                out[rows] = pooled.float().cpu().numpy()
        return out
