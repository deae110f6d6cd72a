"""One definition of the seven emotions, in the FER model's output order, checked against a model's labels."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from emili_core.settings import REPO_ROOT
from emili_session.emotions import EMOTIONS, check_labels


def test_fer2013_order() -> None:
    assert EMOTIONS == ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")


def test_the_shipped_fer_model_outputs_them() -> None:
    manifest = yaml.safe_load(Path(REPO_ROOT / "services/fer/src/emili_fer/models/mini_xception.yaml").read_text())
    check_labels(manifest["labels"], "mini_xception.yaml")


def test_other_labels_or_order_are_refused() -> None:
    with pytest.raises(ValueError, match=r"model.yaml has labels \['neg', 'pos'\]"):
        check_labels(["neg", "pos"], "model.yaml")
    with pytest.raises(ValueError, match="in this order"):
        check_labels(list(reversed(EMOTIONS)), "model.yaml")
