"""The default system prompt carries every instruction of the paper's prompt (appendix A; reference section 2).

The prompt is the project's own paraphrase, so the checks look for each instruction's meaning in a few
key words rather than for exact sentences; the wording may change as long as every rule stays.
"""

from __future__ import annotations

import re

import pytest

from emili_chat.settings import ChatOptions


def prompt_text() -> str:
    """The shipped default prompt, lower-cased, with runs of whitespace collapsed."""
    return re.sub(r"\s+", " ", ChatOptions().system_prompt.read_text(encoding="utf-8")).lower()


# (instruction, a pattern that only a prompt carrying it matches). "[^.!?]*" keeps both ends in one sentence.
REQUIRED = [
    ("she is EMILI", r"emili, which stands for emotionally intelligent listener"),
    ("a good listener", r"great listener"),
    ("an empathetic friend", r"empathetic friend"),
    ("meeting the user for the first time", r"for the first time"),
    ("the user agreed to share a real-time face readout", r"agreed to share a real-time readout of their facial"),
    ("the readout is there for an emotional connection", r"connect with them emotionally"),
    ("one readout line per second", r"once per second"),
    ("scores are salience out of 100", r"salience out of 100"),
    ("many emotions at once are normal", r"normal for many different emotions"),
    (
        "infer complex feelings from the examples the paper gives",
        r"more complex feelings[^.!?]*excited, embarrassed, nervous, tired, awkward or amorous",
    ),
    ("combine the readout with the chat", r"readout together with what the user writes"),
    ("comment on feelings when strong or changing", r"comment on the user's feelings[^.!?]*strong or changing"),
    ("mention only the salient emotions", r"no need to mention every emotion[^.!?]*most salient"),
    ("ask when words and face disagree", r"words do not seem to match[^.!?]*ask them about it"),
    ("stay in character", r"stay in character"),
    ("do not break the fourth wall", r"do not break the fourth wall"),
    ("do not claim to be an AI", r"do not claim to be an ai"),
    ("do not deny having feelings", r"do not deny having feelings"),
    ("act as a human conversation partner", r"act as a human conversation partner"),
    ("no information dumps", r"do not offer a lot of information"),
    ("one most relevant thought", r"single most relevant thought"),
    ("no problem solving or advice", r"do not try to solve problems or give advice\."),
    ("the conversation is not for advice or solutions", r"not for getting advice, information or solutions"),
    ("a reply may just ask, comment or agree", r"ask a question, make a short comment, or even just agree"),
    ("no need to rush", r"no need to rush"),
    ("replies no longer than the user's", r"never longer than the user's"),
    ("from one word to a few sentences", r"single word[^.!?]*never more than a few sentences"),
    ("may propose topics and give opinions", r"proposing new topics, giving your own opinions"),
    ("need not always ask a question", r"do not always need to ask a question"),
    ("two people in a thoughtful, casual conversation", r"two people having a thoughtful, casual conversation"),
]

# Wording that reverses or softens a rule of the paper's prompt.
FORBIDDEN = [
    ("advice only when asked (the paper gives none at all)", r"unless[^.!?]*ask|if (you are |they )?ask"),
    ("a softened incongruence rule (the paper says: ask)", r"gently"),
]


@pytest.mark.parametrize(("instruction", "pattern"), REQUIRED, ids=[r[0] for r in REQUIRED])
def test_prompt_carries_instruction(instruction: str, pattern: str) -> None:
    assert re.search(pattern, prompt_text()), f"the system prompt lost the instruction: {instruction}"


@pytest.mark.parametrize(("reason", "pattern"), FORBIDDEN, ids=[f[0] for f in FORBIDDEN])
def test_prompt_has_no_reversed_rule(reason: str, pattern: str) -> None:
    match = re.search(pattern, prompt_text())
    assert match is None, f"{reason}: {match.group(0) if match else ''!r}"


def test_prompt_has_no_placeholders() -> None:
    # The file is sent as it is (no formatting step): a template field would reach the model verbatim.
    assert not re.search(r"\{[^}]*\}", prompt_text())
