"""One simulated user, free of any transport: what they say, what their face shows, how they answer forms.

Randomness comes from one seed, split into independent generators for the state, the face and the
forms, so the state's trajectory depends only on the seed and the replies received, not on how many
face readings happened to be sent in between (wall-clock timing).
"""

from __future__ import annotations

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
    ) -> None:
        self.persona = persona
        self.seed = seed
        self.face_model = face_model or FaceModelSettings()
        self.scorer = scorer
        state_seq, face_seq, form_seq, trait_seq = np.random.SeedSequence(seed).spawn(4)
        params = state_model or StateModelSettings()
        self.traits = UserTraits.draw(np.random.default_rng(trait_seq), params)
        self.state = HiddenState(persona.emotion, self.traits, params, np.random.default_rng(state_seq))
        self.face_rng = np.random.default_rng(face_seq)
        self.form_rng = np.random.default_rng(form_seq)
        self.last_message = ""

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
        return quality, self.state.react(quality)

    def reading(self) -> Reading:
        return sample_reading(self.state.current, self.traits, self.face_model, self.face_rng)

    def frame(self, faces: FaceSet) -> tuple[str, bytes]:
        """A face image of a class drawn from the expression mean (the likeliest classes stand in for a missing one)."""
        mean = expression_mean(self.state.current, self.traits, self.face_model)
        wanted = target_class(self.state.current, self.traits, self.face_model, self.face_rng)
        order = [EMOTIONS[i] for i in np.argsort(-mean)]
        return faces.pick(wanted, self.face_rng, order)

    def pre_survey(self) -> SurveyAnswers:
        return pre_survey(self.persona, self.state.current, self.form_rng)

    def post_survey(self) -> SurveyAnswers:
        return post_survey(self.persona, self.state, self.form_rng)

    def ratings(self) -> Ratings:
        return ratings(self.state, self.form_rng)
