"""Valence-arousal-dominance lexicons: one in-memory form for the three file formats EMILI reads.

Every loader returns a :class:`Lexicon` whose values are on one scale, [0, 1] per dimension, so results from
different lexicons are comparable in range (not in meaning: each lexicon was rated by different people):

* NRC VAD v1 (2018, TSV ``Word Valence Arousal Dominance`` with a header; the 2022 repackaging has none),
  already in [0, 1];
* NRC VAD v2.1 (2025, TSV ``term valence arousal dominance``, multi-word expressions included), in [-1, 1],
  rescaled with (x + 1) / 2;
* Warriner, Kuperman & Brysbaert (2013) norms (CSV, columns ``Word``, ``V.Mean.Sum``, ``A.Mean.Sum``,
  ``D.Mean.Sum``), means of 1-9 ratings, rescaled with (x - 1) / 8.

The NRC lexicons may not be redistributed: the project reads them by path and never copies them.
"""

from __future__ import annotations

import csv
import enum
import hashlib
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

__all__ = [
    "DIMENSIONS",
    "Lexicon",
    "LexiconFormat",
    "detect_format",
    "load_lexicon",
    "load_nrc_vad_v1",
    "load_nrc_vad_v2",
    "load_warriner",
]

DIMENSIONS: Final = ("valence", "arousal", "dominance")

WARRINER_COLUMNS: Final = ("Word", "V.Mean.Sum", "A.Mean.Sum", "D.Mean.Sum")


class LexiconFormat(enum.StrEnum):
    NRC_VAD_V1 = "nrc-vad-v1"
    NRC_VAD_V2 = "nrc-vad-v2"
    WARRINER = "warriner-2013"

    @classmethod
    def _missing_(cls, value: object) -> LexiconFormat | None:
        # Settings spell them "nrc_v1", "nrc_v2", "warriner"; "nrc-vad-v2.1" names the current release.
        aliases = {"nrc_v1": cls.NRC_VAD_V1, "nrc_v2": cls.NRC_VAD_V2, "nrc-vad-v2.1": cls.NRC_VAD_V2}
        if isinstance(value, str):
            key = value.strip().lower()
            return aliases.get(key) or (cls.WARRINER if key.startswith("warriner") else None)
        return None


@dataclass(frozen=True, eq=False)
class Lexicon:
    """Terms (lowercased, unique) and their VAD values in [0, 1], with the identity of the file they came from.

    ``sha256`` is the digest of the source file's bytes, so two lexicons with the same name but different
    contents are never confused (embedding-cache keys include it). A :meth:`subset` keeps its parent's
    digest; its terms tell it apart.
    """

    name: str
    source: str
    sha256: str
    terms: tuple[str, ...]
    values: npt.NDArray[np.float64]
    index: dict[str, int] = field(init=False, repr=False)
    mwes: frozenset[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        values = np.ascontiguousarray(self.values, dtype=np.float64)
        if values.ndim != 2 or values.shape != (len(self.terms), 3):
            raise ValueError(f"values must have shape ({len(self.terms)}, 3), got {values.shape}")
        if not np.isfinite(values).all():
            raise ValueError(f"lexicon {self.name!r} has non-finite values")
        index = {term: i for i, term in enumerate(self.terms)}
        if len(index) != len(self.terms):
            raise ValueError(f"lexicon {self.name!r} has duplicate terms")
        if any(term != term.lower() for term in self.terms):
            raise ValueError(f"lexicon {self.name!r} terms must be lowercase")
        values.setflags(write=False)  # Shared by scorers and caches: nobody may change it in place.
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "index", index)
        object.__setattr__(self, "mwes", frozenset(term for term in self.terms if len(term.split()) > 1))

    def __len__(self) -> int:
        return len(self.terms)

    def __contains__(self, term: object) -> bool:
        return isinstance(term, str) and term.lower() in self.index

    def get(self, term: str) -> npt.NDArray[np.float64] | None:
        """The term's (valence, arousal, dominance), case-insensitive; None when absent."""
        i = self.index.get(term.lower())
        return None if i is None else self.values[i]

    def subset(self, rows: Sequence[int] | npt.NDArray[np.intp], name: str | None = None) -> Lexicon:
        """A lexicon of the given rows, in the given order (used to hold words out for evaluation)."""
        rows_array = np.asarray(rows, dtype=np.intp)
        return Lexicon(
            name=name or self.name,
            source=self.source,
            sha256=self.sha256,
            terms=tuple(self.terms[i] for i in rows_array.tolist()),
            values=self.values[rows_array],
        )


def _read(path: Path) -> tuple[str, str]:
    data = path.read_bytes()
    # utf-8-sig: a byte-order mark must not end up glued to the first term.
    return data.decode("utf-8-sig"), hashlib.sha256(data).hexdigest()


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _build(
    name: str,
    path: Path,
    digest: str,
    rows: Iterable[tuple[str, float, float, float]],
) -> Lexicon:
    """Lowercase terms and resolve the collisions that lowercasing creates.

    Warriner lists a few words twice, as a proper noun and a common noun ("Pope"/"pope", "AIDS"/"aids").
    Chat text is lowercased before lookup, so only one can be kept: the entry spelled in lowercase in the
    source (the common-noun reading) wins; otherwise the first one does.
    """
    chosen: dict[str, tuple[bool, tuple[float, float, float]]] = {}
    for raw, v, a, d in rows:
        term = " ".join(raw.split()).lower()  # Collapse stray whitespace inside multi-word expressions.
        if not term:
            continue
        is_lower = raw.strip() == raw.strip().lower()
        previous = chosen.get(term)
        if previous is None or (is_lower and not previous[0]):
            chosen[term] = (is_lower, (v, a, d))
    if not chosen:
        raise ValueError(f"{path}: no lexicon entries found")
    terms = tuple(chosen)
    values = np.array([chosen[t][1] for t in terms], dtype=np.float64)
    return Lexicon(name=name, source=str(path), sha256=digest, terms=terms, values=values)


def _tsv_rows(text: str, path: Path) -> tuple[list[str] | None, list[tuple[str, float, float, float]]]:
    """Rows of a 4-column TSV; the first line is a header when its last three fields are not numbers."""
    header: list[str] | None = None
    rows: list[tuple[str, float, float, float]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.rstrip("\r").split("\t")
        if len(fields) != 4:
            raise ValueError(f"{path}:{number}: expected 4 tab-separated fields, got {len(fields)}")
        if number == 1 and not all(_is_number(f) for f in fields[1:]):
            header = fields
            continue
        try:
            rows.append((fields[0], float(fields[1]), float(fields[2]), float(fields[3])))
        except ValueError:
            raise ValueError(f"{path}:{number}: scores must be numbers: {line!r}") from None
    return header, rows


def _check_range(path: Path, rows: Sequence[tuple[str, float, float, float]], low: float, high: float) -> None:
    for term, *scores in rows:
        if not all(low <= s <= high for s in scores):
            raise ValueError(f"{path}: scores of {term!r} lie outside [{low}, {high}]: {scores}")


def load_nrc_vad_v1(path: str | Path, name: str = "nrc-vad-v1") -> Lexicon:
    """NRC VAD v1: values already in [0, 1]; the header line is optional (the 2022 variant has none)."""
    path = Path(path)
    text, digest = _read(path)
    _, rows = _tsv_rows(text, path)
    _check_range(path, rows, 0.0, 1.0)
    return _build(name, path, digest, rows)


def load_nrc_vad_v2(path: str | Path, name: str = "nrc-vad-v2.1") -> Lexicon:
    """NRC VAD v2.x: values in [-1, 1], rescaled to [0, 1] with (x + 1) / 2."""
    path = Path(path)
    text, digest = _read(path)
    _, rows = _tsv_rows(text, path)
    _check_range(path, rows, -1.0, 1.0)
    return _build(name, path, digest, [(t, (v + 1) / 2, (a + 1) / 2, (d + 1) / 2) for t, v, a, d in rows])


def load_warriner(path: str | Path, name: str = "warriner-2013") -> Lexicon:
    """Warriner et al. (2013): the all-rater means of 1-9 ratings, rescaled to [0, 1] with (x - 1) / 8."""
    path = Path(path)
    text, digest = _read(path)
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in WARRINER_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"{path}: not a Warriner norms CSV, missing columns {missing}")
    rows: list[tuple[str, float, float, float]] = []
    for number, record in enumerate(reader, start=2):
        try:
            scores = [float(record[c]) for c in WARRINER_COLUMNS[1:]]
        except (TypeError, ValueError):
            raise ValueError(f"{path}:{number}: scores must be numbers") from None
        rows.append((record["Word"] or "", scores[0], scores[1], scores[2]))
    _check_range(path, rows, 1.0, 9.0)
    return _build(name, path, digest, [(t, (v - 1) / 8, (a - 1) / 8, (d - 1) / 8) for t, v, a, d in rows])


def detect_format(path: str | Path) -> LexiconFormat:
    """Guess the format from the first line: a Warriner CSV header, a v2 ``term`` header, or NRC v1.

    A headerless TSV is taken as NRC v1 (its 2022 repackaging) only when no score is negative; the v2
    files always carry their header.
    """
    path = Path(path)
    with path.open(encoding="utf-8-sig") as f:
        first = f.readline()
        if first.startswith(WARRINER_COLUMNS[0] + ",") and all(c in first for c in WARRINER_COLUMNS[1:]):
            return LexiconFormat.WARRINER
        fields = first.rstrip("\r\n").split("\t")
        if len(fields) != 4:
            raise ValueError(f"{path}: unknown lexicon format (first line {first[:80]!r})")
        if fields[0].lower() == "term":
            return LexiconFormat.NRC_VAD_V2
        if fields[0].lower() == "word":
            return LexiconFormat.NRC_VAD_V1
        for line in [first, *f]:
            if any(field.startswith("-") for field in line.rstrip("\r\n").split("\t")[1:]):
                return LexiconFormat.NRC_VAD_V2
    return LexiconFormat.NRC_VAD_V1


def load_lexicon(path: str | Path, fmt: LexiconFormat | str | None = None, name: str | None = None) -> Lexicon:
    """Load a lexicon in the given format, or the detected one when ``fmt`` is None."""
    lexicon_format = LexiconFormat(fmt) if fmt is not None else detect_format(path)
    if lexicon_format is LexiconFormat.NRC_VAD_V1:
        return load_nrc_vad_v1(path, name=name or "nrc-vad-v1")
    if lexicon_format is LexiconFormat.NRC_VAD_V2:
        return load_nrc_vad_v2(path, name=name or "nrc-vad-v2.1")
    return load_warriner(path, name=name or "warriner-2013")
