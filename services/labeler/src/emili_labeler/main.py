"""Entry points of the labeler service. Not built yet (issue #5): they say so and exit non-zero."""

from __future__ import annotations

import sys

from emili_core.settings import load_settings
from emili_labeler.settings import LabelerSettings

NOT_BUILT = "the labeler service is not implemented yet (issue #5); it is not part of the local stack"


def serve() -> None:
    load_settings(LabelerSettings)  # Still validates configuration, so deploy manifests can be checked.
    sys.exit(NOT_BUILT)


def worker() -> None:
    load_settings(LabelerSettings)
    sys.exit(NOT_BUILT)
