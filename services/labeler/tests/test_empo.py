"""EmPO preference pairs from EmpatheticDialogues and the opposite-emotion table (the real files only if present)."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

from emili_affect.empathetic import EMOTIONS, Dialogue, load_dialogues
from emili_core.settings import REPO_ROOT
from emili_labeler.datasets import content_id
from emili_labeler.empathetic import (
    ASYMMETRIC_OPPOSITES,
    OPPOSITE_EMOTION,
    build_empo_pairs,
    empathetic_sft_examples,
    empo_pairs,
    format_system_prompt,
)

# The reference's table (EMILI.md section 5), verbatim.
REFERENCE_TABLE = """afraid-angry, angry-afraid, sad-joyful, joyful-sad, grateful-disgusted,
  trusting-disgusted, disgusted-trusting, surprised-anticipating, anticipating-surprised, content-anxious,
  anxious-content, apprehensive-annoyed, annoyed-apprehensive, proud-ashamed, ashamed-proud, guilty-proud,
  prepared-anxious, nostalgic-hopeful, hopeful-nostalgic, sentimental-apprehensive, jealous-faithful,
  faithful-jealous, embarrassed-confident, confident-embarrassed, excited-devastated, devastated-excited,
  lonely-caring, caring-lonely, terrified-furious, furious-terrified, disappointed-impressed,
  impressed-disappointed"""

SHARED_ED = Path(os.environ.get("EMILI_SHARED_DATA", REPO_ROOT.parent / "shared" / "data")) / "empatheticdialogues"


# --- the opposite-emotion table -------------------------------------------------------------------------


def test_opposite_table_is_the_reference_table() -> None:
    entries = [(a, b) for a, b in (item.strip().split("-") for item in REFERENCE_TABLE.split(","))]
    assert len(entries) == 32
    assert dict(entries) == dict(OPPOSITE_EMOTION)
    assert list(OPPOSITE_EMOTION) == [e for e, _ in entries]  # Same order too.


def test_opposite_table_covers_all_32_emotions() -> None:
    assert len(EMOTIONS) == len(set(EMOTIONS)) == 32
    assert set(OPPOSITE_EMOTION) == set(EMOTIONS)
    assert set(OPPOSITE_EMOTION.values()) <= set(EMOTIONS)
    assert all(emotion != opposite for emotion, opposite in OPPOSITE_EMOTION.items())


def test_opposite_table_is_symmetric_except_where_the_reference_says_otherwise() -> None:
    asymmetric = {e for e, o in OPPOSITE_EMOTION.items() if OPPOSITE_EMOTION[o] != e}
    assert asymmetric == ASYMMETRIC_OPPOSITES == {"grateful", "guilty", "prepared", "sentimental"}
    for emotion in set(EMOTIONS) - ASYMMETRIC_OPPOSITES:
        assert OPPOSITE_EMOTION[OPPOSITE_EMOTION[emotion]] == emotion


# --- EmPO pairs -----------------------------------------------------------------------------------------


def dialogue(conv_id: str, emotion: str, target: str, split: str = "train") -> Dialogue:
    return Dialogue(conv_id, emotion, f"situation {conv_id}", (f"story {conv_id}", target), split)


def crowd(n: int = 12, split: str = "train") -> list[Dialogue]:
    return [dialogue(f"a{i:02d}", "afraid", f"afraid reply {i}", split) for i in range(n)] + [
        dialogue(f"b{i:02d}", "angry", f"angry reply {i}", split) for i in range(n)
    ]


def test_empo_pairs_use_the_opposite_emotion_and_plain_texts() -> None:
    pairs = empo_pairs(crowd(), epoch=0, seed=1, split="train")
    assert len(pairs) == 24
    for pair in pairs:
        assert pair["rejected_emotion"] == OPPOSITE_EMOTION[pair["emotion"]]
        assert pair["rejected"].startswith(pair["rejected_emotion"])
        assert pair["chosen"] != pair["rejected"]
        assert pair["prompt"][-1]["role"] == "user"
        assert pair["prompt"] == [{"role": "user", "content": f"story {pair['conv_id']}"}]
        assert pair["chosen"] == f"{pair['emotion']} reply {int(pair['conv_id'][1:])}"  # No role tag added.
    assert len({p["id"] for p in pairs}) == 24


def test_empo_pairs_fresh_draw_per_epoch_reproducible_per_seed_and_epoch() -> None:
    dialogues = crowd()
    epoch0 = empo_pairs(dialogues, epoch=0, seed=3, split="train")
    assert empo_pairs(list(reversed(dialogues)), epoch=0, seed=3, split="train") == epoch0
    epoch1 = empo_pairs(dialogues, epoch=1, seed=3, split="train")
    other_seed = empo_pairs(dialogues, epoch=0, seed=4, split="train")
    rejected = [[p["rejected_conv_id"] for p in pairs] for pairs in (epoch0, epoch1, other_seed)]
    assert rejected[0] != rejected[1] and rejected[0] != rejected[2]
    assert [p["chosen"] for p in epoch0] == [p["chosen"] for p in epoch1]  # Only the rejected side is redrawn.
    assert not {p["id"] for p in epoch0} & {p["id"] for p in epoch1}  # Epochs can share one file.


def test_empo_never_rejects_the_chosen_text_and_counts_skips() -> None:
    dialogues = [
        dialogue("a1", "afraid", "Oh no!"),
        dialogue("b1", "angry", "oh  NO!"),  # The only candidate for a1 reads the same: skipped.
        dialogue("s1", "sad", "So sorry."),  # No joyful dialogue at all: skipped.
        dialogue("g1", "grateful", "How kind."),
        dialogue("d1", "disgusted", "Gross."),
        dialogue("t1", "trusting", "I believe you."),
    ]
    result = build_empo_pairs(dialogues, epoch=0, seed=0, split="train")
    assert dict(result.skipped_no_opposite) == {"afraid": 1, "angry": 1, "sad": 1}
    assert result.skipped == 3
    # grateful -> disgusted -> trusting -> disgusted: the table is followed one way, not symmetrised.
    assert [(p["conv_id"], p["rejected_conv_id"]) for p in result.pairs] == [("d1", "t1"), ("g1", "d1"), ("t1", "d1")]
    for epoch in range(20):
        for pair in empo_pairs([*crowd(3), dialogue("b99", "angry", "afraid reply 0")], epoch, 0, split="train"):
            assert pair["chosen"].casefold() != pair["rejected"].casefold()


def test_empo_refuses_the_test_split_unless_asked() -> None:
    test_dialogues = crowd(3, split="test")
    with pytest.raises(ValueError, match="test split"):
        empo_pairs(test_dialogues, 0, 0, split="test")
    with pytest.raises(ValueError, match="split"):
        empo_pairs(test_dialogues, 0, 0, split="train")  # A false declaration does not get past the check.
    with pytest.raises(ValueError, match="split"):
        empo_pairs(crowd(3, split="valid") + crowd(3, split="test")[:1], 0, 0, split="valid")
    assert len(empo_pairs(test_dialogues, 0, 0, split="test", allow_test=True)) == 6


def test_empo_system_prompt_is_formatted_never_a_raw_placeholder() -> None:
    template = "You are a listener. The speaker feels {emotion} because: {situation} {{literal}}"
    pairs = empo_pairs(crowd(2), 0, 0, split="train", system_prompt=template)
    first = pairs[0]
    assert first["prompt"][0] == {
        "role": "system",
        "content": "You are a listener. The speaker feels afraid because: situation a00 {literal}",
    }
    assert [m["role"] for m in first["prompt"]] == ["system", "user"]
    with pytest.raises(ValueError, match="placeholder"):
        empo_pairs(crowd(2), 0, 0, split="train", system_prompt="Hello {name}")
    assert format_system_prompt("No fields.", crowd(1)[0]) == "No fields."


def test_empo_ids_are_content_ids() -> None:
    pair = empo_pairs(crowd(2), 5, 9, split="train")[0]
    body = {"prompt": pair["prompt"], "chosen": pair["chosen"], "rejected": pair["rejected"]}
    assert pair["id"] == content_id({"source": "empathetic", "conv_id": pair["conv_id"], "epoch": 5, **body})


# --- the real files (absent in a fresh clone) -----------------------------------------------------------


@pytest.mark.skipif(not (SHARED_ED / "valid.csv").exists(), reason="EmpatheticDialogues files not present")
def test_real_valid_split_pairs() -> None:
    valid, _ = load_dialogues(SHARED_ED / "valid.csv")
    result = build_empo_pairs(valid, epoch=0, seed=0, split="valid")
    assert len(result.pairs) == 2_769 and result.skipped == 0
    assert all(p["chosen"] != p["rejected"] for p in result.pairs)


def test_empo_rejected_draw_is_balanced_across_the_opposite_emotions_dialogues() -> None:
    """EmPO deals the opposite emotion's dialogues out in turn: with 10 afraid dialogues and 4 angry ones, each
    angry reply is rejected for 2 or 3 afraid dialogues in every epoch (independent draws would often use one 5
    times and another never)."""
    afraid = [dialogue(f"a{i:02d}", "afraid", f"afraid reply {i}") for i in range(10)]
    angry = [dialogue(f"b{i:02d}", "angry", f"angry reply {i}") for i in range(4)]
    deals = []
    for epoch in range(6):
        pairs = [p for p in empo_pairs(afraid + angry, epoch, 7, split="train") if p["emotion"] == "afraid"]
        uses = Counter(p["rejected_conv_id"] for p in pairs)
        assert len(pairs) == 10 and set(uses) == {d.conv_id for d in angry}
        assert sorted(uses.values()) == [2, 2, 3, 3]
        deals.append([p["rejected_conv_id"] for p in pairs])
    assert len({tuple(deal) for deal in deals}) > 1  # Shuffled afresh per epoch.
    # The smaller side each gets a distinct rejected reply: 4 angry dialogues, 4 of the 10 afraid ones.
    angry_pairs = [p for p in empo_pairs(afraid + angry, 0, 7, split="train") if p["emotion"] == "angry"]
    assert len({p["rejected_conv_id"] for p in angry_pairs}) == 4


def test_empathetic_sft_trains_listener_turns_only() -> None:
    long = Dialogue(
        "c1", "sad", "lost a pet", ("My cat died.", "I'm so sorry.", "She was 15.", "That's a long life."), "train"
    )
    records = empathetic_sft_examples([long, *crowd(1)], split="train", system_prompt="The speaker feels {emotion}.")
    assert [r["conv_id"] for r in records] == ["a00", "b00", "c1"]
    messages = records[-1]["messages"]
    assert messages[0] == {"role": "system", "content": "The speaker feels sad."}
    assert [(m["role"], m.get("weight")) for m in messages[1:]] == [
        ("user", None),
        ("assistant", 1),
        ("user", None),
        ("assistant", 1),
    ]
    assert [m["content"] for m in messages[1:]] == list(long.turns)
    assert records[-1]["id"] == content_id({"source": "empathetic", "conv_id": "c1", "messages": messages})
    with pytest.raises(ValueError, match="test split"):
        empathetic_sft_examples(crowd(1, split="test"), split="test")


@pytest.mark.skipif(not (SHARED_ED / "valid.csv").exists(), reason="EmpatheticDialogues files not present")
def test_real_valid_split_sft_and_balance() -> None:
    valid, _ = load_dialogues(SHARED_ED / "valid.csv")
    records = empathetic_sft_examples(valid, split="valid")
    assert len(records) == len(valid)
    assert all(m.get("weight") == 1 for r in records for m in r["messages"] if m["role"] == "assistant")
    pairs = empo_pairs(valid, 0, 0, split="valid")
    for emotion in {d.emotion for d in valid}:
        uses = Counter(p["rejected_conv_id"] for p in pairs if p["emotion"] == emotion)
        assert max(uses.values()) - min(uses.values()) <= 1  # Every opposite dialogue dealt about equally often.
