"""Face sets, personas, surveys and ratings of the user simulator."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from emili_pipeline.simulator.faces import FaceModelSettings, class_name, load_face_set
from emili_pipeline.simulator.personas import Persona, builtin_personas, load_personas, pick
from emili_pipeline.simulator.state import EMOTION_VAD, EmotionState, HiddenState, StateModelSettings, UserTraits
from emili_pipeline.simulator.surveys import CALM_WISHES, FEELING_VAD, LIVELY_WISHES
from emili_pipeline.simulator.user import SimulatedUser
from emili_session.emotions import EMOTIONS

ED = Path("/work/shared/data/empatheticdialogues")
FER2013 = Path("/work/shared/data/fer2013-publictest/fer2013_publictest_48x48.npz")
GOOD = "That sounds wonderful, I'm so glad for you! How did it feel when you heard?"
DISMISSIVE = "Whatever. Calm down, it's no big deal. Anyway, you should move on."


def _png(value: int) -> bytes:
    return cv2.imencode(".png", np.full((8, 8), value, dtype=np.uint8))[1].tobytes()


def test_class_folders(tmp_path: Path) -> None:
    for folder, value in (("happy", 200), ("Sadness", 40), ("neutral", 128), ("not-a-class", 0)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "a.png").write_bytes(_png(value))
    (tmp_path / "happy" / "notes.txt").write_text("ignored")
    faces = load_face_set(tmp_path)
    assert faces.counts() == {"happy": 1, "sad": 1, "neutral": 1}
    rng = np.random.default_rng(0)
    assert faces.pick("happy", rng) == ("happy", _png(200))
    assert faces.pick("sad", rng) == ("sad", _png(40))
    # No fear images: the next class in the given order that has some stands in.
    assert faces.pick("fear", rng, order=["fear", "sad", "happy"]) == ("sad", _png(40))
    assert class_name("Surprised") == "surprise" and class_name("faces") is None


def test_empty_face_set_is_refused(tmp_path: Path) -> None:
    (tmp_path / "happy").mkdir()
    with pytest.raises(ValueError, match="no face images"):
        load_face_set(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_face_set(tmp_path / "missing")


def test_npz_crops_become_centred_jpegs(tmp_path: Path) -> None:
    crops = np.stack([np.full((48, 48), 10 * i, dtype=np.uint8) for i in range(7)])
    np.savez(tmp_path / "faces.npz", images=crops, labels=np.arange(7))
    faces = load_face_set(tmp_path, FaceModelSettings(frame_size=120, face_size=96))
    assert faces.counts() == dict.fromkeys(EMOTIONS, 1)
    label, data = faces.pick("sad", np.random.default_rng(0))
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    assert label == "sad" and image.shape == (120, 120)
    assert abs(int(image[60, 60]) - 40) <= 3 and abs(int(image[2, 2]) - 128) <= 3  # Face in a grey frame.


def test_user_frames_follow_the_state(tmp_path: Path) -> None:
    for folder in EMOTIONS:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.png").write_bytes(_png(EMOTIONS.index(folder)))
    faces = load_face_set(tmp_path)
    joyful = Persona(persona_id="p", emotion="joyful", situation="s", user_lines=["hi"])
    user = SimulatedUser(joyful, 0, face_model=FaceModelSettings())
    user.traits = UserTraits(1.0, 1.0, (0.0,) * 7)
    labels = [user.frame(faces)[0] for _ in range(300)]
    assert labels.count("happy") / len(labels) > 0.4 and labels.count("sad") / len(labels) < 0.05


@pytest.mark.skipif(not FER2013.exists(), reason="FER2013 PublicTest is not in ../shared/data")
def test_fer2013_publictest() -> None:
    faces = load_face_set(FER2013.parent)
    assert faces.counts()["happy"] == 895 and sum(faces.counts().values()) == 3589


def test_builtin_personas() -> None:
    personas = builtin_personas()
    assert len(personas) == 12 and len({p.persona_id for p in personas}) == 12
    assert len({p.emotion for p in personas}) >= 10
    for persona in personas:
        assert 3 <= len(persona.user_lines) <= 4 and persona.pre_text and persona.post_text
        assert persona.emotion in EMOTION_VAD
    assert pick(personas, 12) == personas[0]
    assert load_personas("builtin", limit=3) == personas[:3]


def test_persona_files(tmp_path: Path) -> None:
    item = {"persona_id": "x", "emotion": "Proud", "situation": "I won.", "user_lines": ["I won!"]}
    (tmp_path / "p.json").write_text(json.dumps({"personas": [item]}))
    (tmp_path / "p.yaml").write_text("- persona_id: y\n  emotion: sad\n  situation: Rain.\n  user_lines: [Rain.]\n")
    assert load_personas(str(tmp_path / "p.json"))[0].emotion == "proud"
    assert load_personas(str(tmp_path / "p.yaml"))[0].persona_id == "y"
    (tmp_path / "bad.json").write_text(json.dumps([{**item, "emotion": "meh"}]))
    with pytest.raises(ValueError, match="unknown emotion"):
        load_personas(str(tmp_path / "bad.json"))


@pytest.mark.skipif(not ED.exists(), reason="EmpatheticDialogues is not in ../shared/data")
def test_empathetic_dialogues_personas() -> None:
    personas = load_personas(f"ed:{ED}", limit=50)
    assert len(personas) == 50 and all(p.persona_id.startswith("ed-") for p in personas)
    assert all(p.user_lines and p.situation and "_comma_" not in p.situation for p in personas)
    assert len({p.emotion for p in personas}) > 5


def test_surveys_and_ratings_are_in_range() -> None:
    for seed, persona in enumerate(builtin_personas() * 5):
        user = SimulatedUser(persona, seed)
        pre = user.pre_survey()
        assert pre.current_feelings and set(pre.current_feelings) <= set(FEELING_VAD)
        assert 1 <= len(pre.desired_feelings) <= 2 and set(pre.desired_feelings) <= {*CALM_WISHES, *LIVELY_WISHES}
        assert pre.text == persona.pre_text
        for turn in range(3):
            user.message(turn)
            user.hear(GOOD if seed % 2 else DISMISSIVE)
        post, rated = user.post_survey(), user.ratings()
        assert post.text and set(post.current_feelings) <= set(FEELING_VAD)
        assert all(1 <= r <= 5 for r in (rated.empathy, rated.relevance, rated.fluency)) and rated.comment


def test_ratings_follow_how_the_chat_went() -> None:
    def mean_empathy(reply: str) -> float:
        scores = []
        for seed in range(60):
            user = SimulatedUser(builtin_personas()[1], seed)
            for turn in range(3):
                user.message(turn)
                user.hear(reply)
            scores.append(user.ratings().empathy)
        return float(np.mean(scores))

    assert mean_empathy(GOOD) > mean_empathy(DISMISSIVE) + 1.5


def test_post_survey_text_names_the_change() -> None:
    persona = builtin_personas()[1]
    user = SimulatedUser(persona, 0)
    for turn in range(4):
        user.message(turn)
        user.hear(DISMISSIVE)
    text = user.post_survey().text
    assert "worse" in text and persona.post_text not in text  # Its own post text is for a chat that helped.


def test_follow_ups_after_the_persona_lines() -> None:
    user = SimulatedUser(builtin_personas()[0], 0)
    lines = [user.message(turn) for turn in range(6)]
    assert lines[:4] == builtin_personas()[0].user_lines and all(lines[4:])


def test_state_start_is_near_the_persona_emotion() -> None:
    rng = np.random.default_rng(0)
    state = HiddenState("joyful", UserTraits(1, 1, (0,) * 7), StateModelSettings(start_noise=0.0), rng)
    assert state.start == EmotionState(*EMOTION_VAD["joyful"])
