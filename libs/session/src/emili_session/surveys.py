"""What a participant is asked around a chat: the survey vocabularies and the rating questions.

The feelings are the research group's pre-chat form (reference section 4): how the user feels now, chosen from
:data:`CURRENT_FEELINGS`, and how they would like to feel after the chat, chosen from :data:`DESIRED_FEELINGS`,
each with free text (the source of the VAD gold labels). The ratings are the paper's Table 1: empathy, relevance
and fluency on a Likert scale from 1 (not at all) through 3 (somewhat) to 5 (very much).

Every client that asks these (the browser app through the gateway, ``emili chat`` in a terminal) takes them from
here, so answers recorded anywhere use the same words.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

__all__ = [
    "CURRENT_FEELINGS",
    "DESIRED_FEELINGS",
    "LIKERT_LABELS",
    "LIKERT_SCALE",
    "RATING_DIMENSIONS",
    "RATING_QUESTIONS",
]

CURRENT_FEELINGS: Final[tuple[str, ...]] = ("Angry", "Tired", "Anxious", "Happy", "Sad", "Surprised", "Neutral")
DESIRED_FEELINGS: Final[tuple[str, ...]] = (
    "Surprised",
    "Excited",
    "Proud",
    "Grateful",
    "Impressed",
    "Hopeful",
    "Confident",
    "Caring",
    "Joyful",
    "Content",
    "Peaceful",
    "Determined",
)

RATING_DIMENSIONS: Final[tuple[str, ...]] = ("empathy", "relevance", "fluency")
# The paper's question for each rating (section 1.6 of the reference), in RATING_DIMENSIONS order.
RATING_QUESTIONS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "empathy": "Empathy: did the responses show understanding?",
        "relevance": "Relevance: were the responses appropriate and on-topic?",
        "fluency": "Fluency: were the responses clear and easy to understand?",
    }
)
LIKERT_SCALE: Final[tuple[int, ...]] = (1, 2, 3, 4, 5)
# The scale's labelled points, as the paper words them.
LIKERT_LABELS: Final[Mapping[int, str]] = MappingProxyType({1: "Not at all", 3: "Somewhat", 5: "Very much"})
