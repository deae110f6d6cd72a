"""Entry points of the trainer service. Not built yet (issue #6): they say so and exit non-zero."""

from __future__ import annotations

import sys

from emili_core.settings import load_settings
from emili_trainer.settings import TrainerSettings

NOT_BUILT = "the trainer service is not implemented yet (issue #6); it is not part of the local stack"


def serve() -> None:
    load_settings(TrainerSettings)  # Still validates configuration, so deploy manifests can be checked.
    sys.exit(NOT_BUILT)


def worker() -> None:
    load_settings(TrainerSettings)
    sys.exit(NOT_BUILT)
