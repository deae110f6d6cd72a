"""Lexicon loaders on tiny files in each format (hand-checked rescaling), and on the real files when present."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from emili_affect.vad import (
    Lexicon,
    LexiconFormat,
    detect_format,
    load_lexicon,
    load_nrc_vad_v1,
    load_nrc_vad_v2,
    load_warriner,
)
from emili_core.settings import REPO_ROOT

SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
ARTIFACTS = REPO_ROOT / "var" / "artifacts" / "labeler"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_nrc_v1_with_header(tmp_path: Path) -> None:
    path = write(
        tmp_path / "v1.txt",
        "Word\tValence\tArousal\tDominance\nhappy\t1.000\t0.735\t0.772\naltar boy\t0.5\t0.25\t0.125\n",
    )
    lexicon = load_nrc_vad_v1(path)
    assert lexicon.terms == ("happy", "altar boy")
    np.testing.assert_allclose(lexicon.values, [[1.0, 0.735, 0.772], [0.5, 0.25, 0.125]])
    assert lexicon.mwes == frozenset({"altar boy"})
    assert lexicon.name == "nrc-vad-v1"
    assert lexicon.source == str(path)
    assert len(lexicon.sha256) == 64


def test_nrc_v1_2022_variant_without_header(tmp_path: Path) -> None:
    path = write(tmp_path / "v1-2022.txt", "aaaaaaah\t0.479\t0.606\t0.291\naardvark\t0.427\t0.490\t0.437\n")
    lexicon = load_nrc_vad_v1(path)
    assert lexicon.terms == ("aaaaaaah", "aardvark")
    np.testing.assert_allclose(lexicon.values[0], [0.479, 0.606, 0.291])
    assert detect_format(path) is LexiconFormat.NRC_VAD_V1


def test_nrc_v2_is_rescaled_from_minus_one_one(tmp_path: Path) -> None:
    path = write(
        tmp_path / "v2.txt",
        "term\tvalence\tarousal\tdominance\naaaaaaah\t-0.042\t0.212\t-0.418\n"
        "can't wait\t1.000\t-1.000\t0.000\na no-brainer\t0.5\t-0.5\t0.25\n",
    )
    lexicon = load_nrc_vad_v2(path)
    # (x + 1) / 2 by hand: -0.042 -> 0.479, 0.212 -> 0.606, -0.418 -> 0.291.
    np.testing.assert_allclose(lexicon.values[0], [0.479, 0.606, 0.291])
    np.testing.assert_allclose(lexicon.values[1], [1.0, 0.0, 0.5])
    np.testing.assert_allclose(lexicon.values[2], [0.75, 0.25, 0.625])
    assert lexicon.mwes == frozenset({"can't wait", "a no-brainer"})
    assert detect_format(path) is LexiconFormat.NRC_VAD_V2


def test_warriner_is_rescaled_from_one_nine(tmp_path: Path) -> None:
    path = write(
        tmp_path / "norms.csv",
        "Word,V.Mean.Sum,V.SD.Sum,A.Mean.Sum,A.SD.Sum,D.Mean.Sum,D.SD.Sum\n"
        "aardvark,6.26,2.21,2.41,1.4,4.27,1.75\n"
        "Coke,6.62,1.0,4.45,1.0,5.67,1.0\n"
        "coke,6.55,1.0,4.3,1.0,5.53,1.0\n"
        "Pope,3.7,1.0,3.59,1.0,3.84,1.0\n"
        "Dr. Pepper,9,1.0,1,1.0,5,1.0\n",
    )
    lexicon = load_warriner(path)
    assert detect_format(path) is LexiconFormat.WARRINER
    # (x - 1) / 8 by hand: 6.26 -> 0.6575, 2.41 -> 0.17625, 4.27 -> 0.40875.
    np.testing.assert_allclose(lexicon.get("aardvark"), [0.6575, 0.17625, 0.40875])  # type: ignore[arg-type]
    # "Coke" and "coke" collide once lowercased: the entry spelled in lowercase wins, wherever it is.
    np.testing.assert_allclose(lexicon.get("coke"), [(6.55 - 1) / 8, (4.3 - 1) / 8, (5.53 - 1) / 8])  # type: ignore[arg-type]
    assert lexicon.terms == ("aardvark", "coke", "pope", "dr. pepper")
    np.testing.assert_allclose(lexicon.get("dr. pepper"), [1.0, 0.0, 0.5])  # type: ignore[arg-type]
    assert lexicon.mwes == frozenset({"dr. pepper"})


def test_lookup_is_case_insensitive(tmp_path: Path) -> None:
    lexicon = load_nrc_vad_v1(write(tmp_path / "v1.txt", "happy\t1.0\t0.7\t0.8\n"))
    assert "Happy" in lexicon and "HAPPY" in lexicon
    np.testing.assert_allclose(lexicon.get("HaPpY"), [1.0, 0.7, 0.8])  # type: ignore[arg-type]
    assert lexicon.get("sad") is None


def test_load_lexicon_dispatches_and_names(tmp_path: Path) -> None:
    path = write(tmp_path / "v2.txt", "term\tvalence\tarousal\tdominance\nok\t0\t0\t0\n")
    lexicon = load_lexicon(path)
    assert lexicon.name == "nrc-vad-v2.1"
    np.testing.assert_allclose(lexicon.values, [[0.5, 0.5, 0.5]])
    assert load_lexicon(path, name="mine").name == "mine"
    # Forcing v1 on v2 values fails loudly instead of silently mis-scaling.
    with pytest.raises(ValueError, match="outside"):
        load_lexicon(write(tmp_path / "neg.txt", "bad\t-0.5\t0\t0\n"), fmt="nrc-vad-v1")
    assert detect_format(tmp_path / "neg.txt") is LexiconFormat.NRC_VAD_V2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("word\t0.1\t0.2\n", "4 tab-separated"),
        ("Word\tValence\tArousal\tDominance\nword\t0.1\tx\t0.2\n", "numbers"),
        ("Word\tValence\tArousal\tDominance\n", "no lexicon entries"),
        ("word\t0.1\t0.2\t1.5\n", "outside"),
    ],
)
def test_bad_files_are_rejected(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_nrc_vad_v1(write(tmp_path / "bad.txt", text))


def test_warriner_needs_its_columns(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="missing columns"):
        load_warriner(write(tmp_path / "x.csv", "Word,Valence\nhappy,8\n"))


def test_identity_and_subset(tmp_path: Path) -> None:
    path = write(tmp_path / "v1.txt", "a1\t0.1\t0.2\t0.3\nb2\t0.4\t0.5\t0.6\nc3\t0.7\t0.8\t0.9\n")
    lexicon = load_nrc_vad_v1(path)
    other = load_nrc_vad_v1(write(tmp_path / "v1b.txt", "a1\t0.1\t0.2\t0.3\n"))
    assert lexicon.sha256 != other.sha256
    part = lexicon.subset([2, 0], name="part")
    assert part.terms == ("c3", "a1") and part.name == "part" and part.sha256 == lexicon.sha256
    np.testing.assert_allclose(part.values, [[0.7, 0.8, 0.9], [0.1, 0.2, 0.3]])
    with pytest.raises(ValueError, match="read-only"):
        lexicon.values[0, 0] = 1.0


def test_lexicon_validates_its_contents() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        Lexicon("x", "mem", "0" * 64, ("a", "a"), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="lowercase"):
        Lexicon("x", "mem", "0" * 64, ("A",), np.zeros((1, 3)))
    with pytest.raises(ValueError, match="shape"):
        Lexicon("x", "mem", "0" * 64, ("a",), np.zeros((1, 2)))


@pytest.mark.parametrize(
    ("relative", "count", "mwes"),
    [
        ("nrc-vad-v1/NRC-VAD-Lexicon.txt", 20_007, 130),
        ("nrc-vad-v1/NRC-VAD-Lexicon-2022-identity-terms-removed.txt", 19_971, 132),
        ("nrc-vad-v2.1/NRC-VAD-Lexicon-v2.1.txt", 54_801, 10_073),
    ],
)
def test_real_nrc_files(relative: str, count: int, mwes: int) -> None:
    path = SHARED_DATA / relative
    if not path.is_file():
        pytest.skip(f"{path} is not available (the NRC lexicons are never part of the repository)")
    lexicon = load_lexicon(path)
    assert len(lexicon) == count
    assert len(lexicon.mwes) == mwes
    assert lexicon.values.min() >= 0.0 and lexicon.values.max() <= 1.0
    assert lexicon.get("Happy") is not None


def test_real_warriner_file() -> None:
    path = ARTIFACTS / "NoVAD_v2013.csv"
    if not path.is_file():
        pytest.skip(f"{path} is missing; run `make setup`")
    lexicon = load_lexicon(path)
    # 13,915 rows; 10 words appear twice once lowercased (Pope/pope, AIDS/aids, ...).
    assert len(lexicon) == 13_905
    np.testing.assert_allclose(lexicon.get("aardvark"), [(6.26 - 1) / 8, (2.41 - 1) / 8, (4.27 - 1) / 8])  # type: ignore[arg-type]
    assert lexicon.values.min() >= 0.0 and lexicon.values.max() <= 1.0


def test_format_aliases_of_the_settings() -> None:
    assert LexiconFormat("nrc_v1") is LexiconFormat.NRC_VAD_V1
    assert LexiconFormat("nrc_v2") is LexiconFormat.NRC_VAD_V2
    assert LexiconFormat("nrc-vad-v2.1") is LexiconFormat.NRC_VAD_V2
    assert LexiconFormat("warriner") is LexiconFormat.WARRINER
    with pytest.raises(ValueError):
        LexiconFormat("anew")
