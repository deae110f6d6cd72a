"""EmpatheticDialogues loading (tiny CSVs in tmp_path; the real files only if present)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

from emili_affect.empathetic import COLUMNS, EMOTIONS, load_dialogues, split_of
from emili_core.settings import REPO_ROOT

SHARED_ED = Path(os.environ.get("EMILI_SHARED_DATA", REPO_ROOT.parent / "shared" / "data")) / "empatheticdialogues"


# --- loading --------------------------------------------------------------------------------------------


def test_the_32_emotion_labels() -> None:
    assert len(EMOTIONS) == len(set(EMOTIONS)) == 32
    assert list(EMOTIONS) == sorted(EMOTIONS)


def _rows(conv: str, emotion: str, situation: str, utterances: list[str]) -> list[list[str]]:
    return [
        [conv, str(i), emotion, situation, str((i - 1) % 2), u, "5|5|5_2|2|5", ""] for i, u in enumerate(utterances, 1)
    ]


def write_csv(path: Path, rows: list[list[str]], raw_lines: tuple[str, ...] = (), crlf: bool = False) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\r\n" if crlf else "\n")
        writer.writerow(COLUMNS)
        writer.writerows(rows)
        for line in raw_lines:
            f.write(line + ("\r\n" if crlf else "\n"))
    return path


def tiny_csv(path: Path, crlf: bool = False) -> Path:
    rows = (
        _rows("hit:1_conv:1", "afraid", "A dog chased me_comma_ at night.", ["I was so scared_comma_ truly.", "Oh no!"])
        + _rows(
            "hit:2_conv:2",
            "angry",
            "My bike got stolen.",
            ["Someone stole my bike.", "That's awful.", "Yes.", "Call the police."],
        )
        # Ends with the speaker: cut after the listener reply, or dropped.
        + _rows("hit:3_conv:3", "sad", "My cat died.", ["My cat died.", "I'm so sorry.", "Thanks."])
        + _rows("hit:4_conv:4", "joyful", "I won.", ["I won the lottery!"])  # One turn: dropped.
        + [r for r in _rows("hit:5_conv:5", "joyful", "Party.", ["a", "b", "c", "d"]) if r[1] != "2"]  # Gap.
        + [["hit:6_conv:6", "x", "joyful", "s", "0", "utterance with a bad index", "", ""]]  # Malformed.
        + [["hit:7_conv:7", "1", "happy", "s", "0", "not one of the 32 emotions", "", ""]]  # Malformed.
    )
    return write_csv(path, rows, raw_lines=("hit:8_conv:8,1,sad,too few fields",), crlf=crlf)


@pytest.mark.parametrize("crlf", [False, True])
def test_load_dialogues_builds_turns_and_counts_skips(tmp_path: Path, crlf: bool) -> None:
    dialogues, report = load_dialogues(tiny_csv(tmp_path / "train.csv", crlf), trailing_speaker="truncate")
    assert report.split == "train"
    assert report.rows == 16 and report.malformed_rows == 3
    assert report.malformed_reasons == {"utterance_idx": 1, "emotion": 1, "field_count": 1}
    assert (report.conversations, report.dropped_gaps, report.dropped_short) == (5, 1, 1)
    assert (report.truncated_trailing_speaker, report.dialogues) == (2, 3)  # conv 3, and conv 4 before its drop.
    by_id = {d.conv_id: d for d in dialogues}
    assert sorted(by_id) == ["hit:1_conv:1", "hit:2_conv:2", "hit:3_conv:3"]
    first = by_id["hit:1_conv:1"]
    assert first.situation == "A dog chased me, at night." and first.turns[0] == "I was so scared, truly."
    assert first.target == "Oh no!" and first.emotion == "afraid"
    assert by_id["hit:2_conv:2"].target == "Call the police."
    assert by_id["hit:2_conv:2"].context_messages() == [
        {"role": "user", "content": "Someone stole my bike."},
        {"role": "assistant", "content": "That's awful."},
        {"role": "user", "content": "Yes."},
    ]
    assert by_id["hit:3_conv:3"].turns == ("My cat died.", "I'm so sorry.")


def test_load_dialogues_can_drop_dialogues_ending_with_the_speaker(tmp_path: Path) -> None:
    dialogues, report = load_dialogues(tiny_csv(tmp_path / "valid.csv"), trailing_speaker="drop")
    assert [d.conv_id for d in dialogues] == ["hit:1_conv:1", "hit:2_conv:2"]
    assert (report.dropped_trailing_speaker, report.dropped_short, report.split) == (2, 0, "valid")


def test_load_dialogues_rejects_other_columns_and_unknown_split(tmp_path: Path) -> None:
    bad = tmp_path / "train.csv"
    bad.write_text("a,b,c\n1,2,3\n", encoding="utf-8")
    with pytest.raises(ValueError, match="columns"):
        load_dialogues(bad)
    with pytest.raises(ValueError, match="split"):
        split_of(tmp_path / "dialogues.csv")
    assert split_of("x/empathetic_dialogues_validation.csv") == "valid"
    assert load_dialogues(tiny_csv(tmp_path / "whatever.csv"), split="train")[1].split == "train"


# --- the real files (absent in a fresh clone) -----------------------------------------------------------


@pytest.mark.skipif(not (SHARED_ED / "test.csv").exists(), reason="EmpatheticDialogues files not present")
def test_real_files_counts() -> None:
    test, report = load_dialogues(SHARED_ED / "test.csv")
    assert (report.rows, report.malformed_rows, report.conversations) == (10_973, 0, 2_547)
    assert report.truncated_trailing_speaker == 455 and len(test) == 2_547  # The reference: 2,540 after its filter.
    assert load_dialogues(SHARED_ED / "test.csv", trailing_speaker="drop")[1].dialogues == 2_092
    assert {d.emotion for d in test} == set(EMOTIONS)
    assert not any("_comma_" in t for d in test for t in d.turns)
    valid, valid_report = load_dialogues(SHARED_ED / "valid.csv")
    assert (valid_report.rows, valid_report.conversations, len(valid)) == (12_078, 2_770, 2_769)
