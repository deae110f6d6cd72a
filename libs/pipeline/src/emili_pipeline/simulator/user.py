"""One simulated user, free of any transport: what they say, what their face shows, how they answer forms.

Randomness comes from one seed, split into independent generators for the state, the face and the
forms, so the state's trajectory depends only on the seed and the replies received, not on how many
face readings happened to be sent in between (wall-clock timing).

Feedback ``noise`` (simulation studies: what the loop does when its feedback signal carries no information): the
face shows a decoy state that moves after each reply by a quality drawn at random, unrelated to the reply, while
the user's real state (surveys, ratings, what the study measures) still follows the reply's quality. Reactions
and flags then look as lively as usual and say nothing about the replies.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from emili_pipeline.simulator.faces import (
    FaceModelSettings,
    FaceSet,
    Reading,
    expression_mean,
    sample_reading,
    target_class,
)
from emili_pipeline.simulator.personas import Persona
from emili_pipeline.simulator.state import (
    EmotionState,
    HiddenState,
    ReplyQuality,
    ReplyScorer,
    StateModelSettings,
    UserTraits,
    reply_quality,
)
from emili_pipeline.simulator.surveys import Ratings, SurveyAnswers, post_survey, pre_survey, ratings
from emili_session.emotions import EMOTIONS

Feedback = Literal["state", "noise"]

# Said once the persona's own lines run out, by how the chat is going.
FOLLOW_UPS = {
    "good": ("Thanks, that's nice to hear.", "Yeah, exactly!", "It helps to talk about it.", "You're right."),
    "flat": ("Yeah, I guess so.", "Maybe.", "I hadn't thought of it like that.", "Hmm, I'm not sure."),
    "bad": ("I'm not sure you get what I mean.", "That doesn't really help.", "Okay...", "Never mind."),
}


class SimulatedUser:
    def __init__(
        self,
        persona: Persona,
        seed: int,
        *,
        state_model: StateModelSettings | None = None,
        face_model: FaceModelSettings | None = None,
        scorer: ReplyScorer = reply_quality,
        feedback: Feedback = "state",
    ) -> None:
        self.persona = persona
        self.seed = seed
        self.face_model = face_model or FaceModelSettings()
        self.scorer = scorer
        # A fifth stream for the decoy: the first four are the same as without it, so "state" runs are unchanged.
        state_seq, face_seq, form_seq, trait_seq, decoy_seq = np.random.SeedSequence(seed).spawn(5)
        params = state_model or StateModelSettings()
        self.traits = UserTraits.draw(np.random.default_rng(trait_seq), params)
        self.state = HiddenState(persona.emotion, self.traits, params, np.random.default_rng(state_seq))
        self.face_rng = np.random.default_rng(face_seq)
        self.form_rng = np.random.default_rng(form_seq)
        self.last_message = ""
        self.decoy: HiddenState | None = None
        if feedback == "noise":
            decoy_rng = np.random.default_rng(decoy_seq)
            self.decoy = HiddenState(persona.emotion, self.traits, params, decoy_rng)
            self.decoy.start, self.decoy.current = self.state.start, self.state.start

    def message(self, turn: int) -> str:
        """The user's ``turn``-th message (from 0): the persona's lines, then follow-ups."""
        if turn < len(self.persona.user_lines):
            text = self.persona.user_lines[turn]
        else:
            last = self.state.qualities[-1].score if self.state.qualities else 0.0
            mood = "good" if last > 0.2 else "bad" if last < -0.2 else "flat"
            options = FOLLOW_UPS[mood]
            text = options[int(self.form_rng.integers(len(options)))]
        self.last_message = text
        return text

    def hear(self, reply: str) -> tuple[ReplyQuality, EmotionState]:
        """React to one assistant reply (prompted or unprompted)."""
        quality = self.scorer(reply, self.last_message)
        if self.decoy is not None:
            self.decoy.react(noise_quality(self.decoy.rng))
        return quality, self.state.react(quality)

    @property
    def shown(self) -> EmotionState:
        """The state the face shows: the real one, or the decoy under feedback noise."""
        return self.decoy.current if self.decoy is not None else self.state.current

    def reading(self) -> Reading:
        return sample_reading(self.shown, self.traits, self.face_model, self.face_rng)

    def frame(self, faces: FaceSet) -> tuple[str, bytes]:
        """A face image of a class drawn from the expression mean (the likeliest classes stand in for a missing one)."""
        mean = expression_mean(self.shown, self.traits, self.face_model)
        wanted = target_class(self.shown, self.traits, self.face_model, self.face_rng)
        order = [EMOTIONS[i] for i in np.argsort(-mean)]
        return faces.pick(wanted, self.face_rng, order)

    def pre_survey(self) -> SurveyAnswers:
        return pre_survey(self.persona, self.state.current, self.form_rng)

    def post_survey(self) -> SurveyAnswers:
        return post_survey(self.persona, self.state, self.form_rng)

    def ratings(self) -> Ratings:
        return ratings(self.state, self.form_rng)


def noise_quality(rng: np.random.Generator) -> ReplyQuality:
    """A reply "quality" that ignores the reply: uniform on [-1, 1], the whole range a real reply can score."""
    return ReplyQuality(float(rng.uniform(-1.0, 1.0)), {"noise": 1.0})
