"""The participant's steps around a terminal chat (``emili chat``): consent, the surveys and the rating.

A session is usable for training when it has the user's consent, a pre-chat survey, a post-chat survey (their
free texts give the VAD gold labels) and a rating (the paper's Table 1). The questions are the ones the gateway's
browser app asks, from the same vocabularies (``emili_session.surveys``):

* consent, two separate yes/no questions: keep the face frames (only asked when frames are sent), and use the
  conversation for training (declining still allows the chat);
* before the chat: current feelings and desired feelings, each chosen by number or name, comma-separated (Enter
  for none), and a few sentences on how the user feels and why;
* after the chat: current feelings and a few sentences on how the user feels now;
* the rating: empathy, relevance and fluency, each 1 (not at all) to 5 (very much), and an optional comment.

Every answer can be given beforehand (:class:`Preset`, from the command's options), so scripts and tests run
the command without a terminal. Standard input is read by one thread (:class:`Lines`), shared by the chat and
the questions, so a line typed as the chat ends is never lost and a waiting read never delays the exit.
"""

from __future__ import annotations

import asyncio
import queue
import re
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO

from rich.columns import Columns
from rich.console import Console
from rich.markup import escape

from emili_session.surveys import (
    CURRENT_FEELINGS,
    DESIRED_FEELINGS,
    LIKERT_LABELS,
    LIKERT_SCALE,
    RATING_DIMENSIONS,
    RATING_QUESTIONS,
)

__all__ = [
    "Consent",
    "Lines",
    "NoAnswer",
    "Preset",
    "Rating",
    "Survey",
    "ask_consent",
    "ask_post_survey",
    "ask_pre_survey",
    "ask_rating",
    "parse_feelings",
    "parse_rating",
]

PRE_TEXT_QUESTION = "In a few sentences: how are you feeling today, and why?"
POST_TEXT_QUESTION = "In a few sentences: how are you feeling now, after the chat?"
CURRENT_QUESTION = "Right now I feel… (choose any)"
DESIRED_QUESTION = "After this chat I would like to feel… (choose any)"
FRAMES_QUESTION = "May the camera pictures of your face be stored for the research?"
TRAINING_QUESTION = "May your conversation be used to train future versions of the AI?"
COMMENT_QUESTION = "Anything else you would like to tell us? (optional; Enter to skip)"


@dataclass(frozen=True)
class Consent:
    store_frames: bool
    use_for_training: bool


@dataclass(frozen=True)
class Survey:
    current_feelings: list[str]
    desired_feelings: list[str]
    text: str


@dataclass(frozen=True)
class Rating:
    empathy: int
    relevance: int
    fluency: int
    comment: str = ""

    def scores(self) -> dict[str, int]:
        return {"empathy": self.empathy, "relevance": self.relevance, "fluency": self.fluency}


@dataclass(frozen=True)
class Preset:
    """Answers given as options; None means ask. ``rating`` given makes the comment default to none."""

    consent_frames: bool | None = None
    consent_training: bool | None = None
    feelings: list[str] | None = None
    desired_feelings: list[str] | None = None
    pre_text: str | None = None
    post_feelings: list[str] | None = None
    post_text: str | None = None
    rating: dict[str, int] | None = None
    comment: str | None = None


# --- parsing (also used to check the options) -------------------------------------------------------------------


def parse_feelings(answer: str, vocabulary: Sequence[str]) -> list[str]:
    """Feelings chosen by number (1-based, as listed) or name (any case), separated by commas or spaces.

    Returns the vocabulary's spelling in the order given, without repeats; raises ValueError naming what is
    not offered. An empty answer chooses none.
    """
    chosen: list[str] = []
    by_name = {v.casefold(): v for v in vocabulary}
    for item in (part for part in re.split(r"[,\s]+", answer.strip()) if part):
        if item.isdigit():
            number = int(item)
            if not 1 <= number <= len(vocabulary):
                raise ValueError(f"{item} is not one of the numbers 1 to {len(vocabulary)}")
            feeling = vocabulary[number - 1]
        elif item.casefold() in by_name:
            feeling = by_name[item.casefold()]
        else:
            raise ValueError(f"{item!r} is not offered; choose from {', '.join(vocabulary)} (or their numbers)")
        if feeling not in chosen:
            chosen.append(feeling)
    return chosen


def parse_rating(answer: str) -> dict[str, int]:
    """``"4,4,5"``: empathy, relevance and fluency, each 1-5; raises ValueError saying what is wrong."""
    parts = [p for p in re.split(r"[,\s]+", answer.strip()) if p]
    if len(parts) != len(RATING_DIMENSIONS) or not all(p.isdigit() for p in parts):
        raise ValueError(f"give three whole numbers for {', '.join(RATING_DIMENSIONS)}, e.g. 4,4,5")
    scores = {dim: int(p) for dim, p in zip(RATING_DIMENSIONS, parts, strict=True)}
    for dim, value in scores.items():
        if value not in LIKERT_SCALE:
            raise ValueError(f"{dim} must be from 1 (not at all) to 5 (very much), not {value}")
    return scores


# --- standard input -----------------------------------------------------------------------------------------


class Lines:
    """Standard input, read line by line by one daemon thread; ``None`` marks the end of input (Ctrl-D).

    On a terminal, reading goes on after Ctrl-D (it ends the chat, and the questions after it still get answers);
    from a file or pipe, the end is final and every later read returns None at once.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stdin
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._finished = threading.Event()
        threading.Thread(target=self._read, name="emili-chat-stdin", daemon=True).start()

    def _read(self) -> None:
        try:
            interactive = self.stream.isatty()
        except (AttributeError, ValueError):
            interactive = False
        while True:
            try:
                line = self.stream.readline()
            except (OSError, ValueError):
                line = ""
            if line:
                self._lines.put(line.rstrip("\r\n"))
                continue
            if not interactive:
                self._finished.set()
            self._lines.put(None)
            if not interactive:
                return

    async def get(self) -> str | None:
        """The next line, or None at the end of input; it polls, so no executor thread is ever left waiting."""
        while True:
            try:
                return self._lines.get_nowait()
            except queue.Empty:
                if self._finished.is_set():
                    return None
                await asyncio.sleep(0.05)


# --- questions ----------------------------------------------------------------------------------------------


class NoAnswer(Exception):
    """Input ended before the question was answered."""


async def _ask(console: Console, lines: Lines, question: str) -> str:
    console.print(f"[bold]{question}[/bold] ", end="")
    answer = await lines.get()
    if answer is None:
        console.print()
        raise NoAnswer(question)
    return answer.strip()


async def ask_yes_no(console: Console, lines: Lines, question: str) -> bool:
    while True:
        answer = (await _ask(console, lines, f"{escape(question)} \\[y/n]")).casefold()
        if answer in {"y", "yes"}:
            return True
        if answer in {"n", "no"}:
            return False
        console.print("[yellow]Please answer y (yes) or n (no).[/yellow]")


async def ask_feelings(console: Console, lines: Lines, question: str, vocabulary: Sequence[str]) -> list[str]:
    console.print(f"[bold]{escape(question)}[/bold]")
    console.print(Columns([f"[cyan]{i:>2}[/cyan] {escape(v)}" for i, v in enumerate(vocabulary, 1)], padding=(0, 3)))
    while True:
        answer = await _ask(console, lines, "Numbers or names, comma-separated (Enter for none):")
        try:
            return parse_feelings(answer, vocabulary)
        except ValueError as exc:
            console.print(f"[yellow]{escape(str(exc))}[/yellow]")


async def ask_text(console: Console, lines: Lines, question: str) -> str:
    while True:
        answer = await _ask(console, lines, escape(question))
        if answer:
            return answer
        console.print("[yellow]Please write at least a few words.[/yellow]")


async def ask_likert(console: Console, lines: Lines, dimension: str) -> int:
    scale = ", ".join(f"{n} {label.lower()}" for n, label in LIKERT_LABELS.items())
    console.print(f"[bold]{escape(RATING_QUESTIONS[dimension])}[/bold] [dim]({scale})[/dim]")
    while True:
        answer = await _ask(console, lines, "1-5:")
        if answer.isdigit() and int(answer) in LIKERT_SCALE:
            return int(answer)
        console.print("[yellow]Please answer with a whole number from 1 to 5.[/yellow]")


async def ask_consent(console: Console, lines: Lines, preset: Preset, *, frames_sent: bool) -> Consent:
    """The two consent questions (frames only when frames are sent: otherwise none can be stored)."""
    if not frames_sent:
        store_frames = False
    elif preset.consent_frames is not None:
        store_frames = preset.consent_frames
    else:
        store_frames = await ask_yes_no(console, lines, FRAMES_QUESTION)
    if preset.consent_training is not None:
        use_for_training = preset.consent_training
    else:
        use_for_training = await ask_yes_no(console, lines, TRAINING_QUESTION)
    if not use_for_training:
        console.print("[dim]Your conversation will not be used for training. You can still chat.[/dim]")
    return Consent(store_frames=store_frames, use_for_training=use_for_training)


async def ask_pre_survey(console: Console, lines: Lines, preset: Preset) -> Survey:
    if None in (preset.feelings, preset.desired_feelings, preset.pre_text):
        console.rule("Before the chat")
    current = preset.feelings
    if current is None:
        current = await ask_feelings(console, lines, CURRENT_QUESTION, CURRENT_FEELINGS)
    desired = preset.desired_feelings
    if desired is None:
        desired = await ask_feelings(console, lines, DESIRED_QUESTION, DESIRED_FEELINGS)
    text = preset.pre_text if preset.pre_text is not None else await ask_text(console, lines, PRE_TEXT_QUESTION)
    return Survey(current_feelings=current, desired_feelings=desired, text=text)


async def ask_post_survey(console: Console, lines: Lines, preset: Preset) -> Survey:
    if None in (preset.post_feelings, preset.post_text):
        console.print()
        console.rule("After the chat")
    current = preset.post_feelings
    if current is None:
        current = await ask_feelings(console, lines, CURRENT_QUESTION, CURRENT_FEELINGS)
    text = preset.post_text if preset.post_text is not None else await ask_text(console, lines, POST_TEXT_QUESTION)
    return Survey(current_feelings=current, desired_feelings=[], text=text)


async def ask_rating(console: Console, lines: Lines, preset: Preset) -> Rating:
    if preset.rating is not None:
        scores = preset.rating
    else:
        console.print("[bold]Please rate EMILI's responses[/bold] (1 = not at all, 3 = somewhat, 5 = very much).")
        scores = {dim: await ask_likert(console, lines, dim) for dim in RATING_DIMENSIONS}
    if preset.comment is not None:
        comment = preset.comment
    elif preset.rating is not None:
        comment = ""
    else:
        try:
            comment = await _ask(console, lines, escape(COMMENT_QUESTION))
        except NoAnswer:
            comment = ""  # Optional: the end of input just means none.
    return Rating(**scores, comment=comment)
