"""Entry points of the chat service. Not built yet (issue #4): they say so and exit non-zero."""

from __future__ import annotations

import sys

from emili_chat.settings import ChatSettings
from emili_core.settings import load_settings

NOT_BUILT = "the chat service is not implemented yet (issue #4); it is not part of the local stack"


def serve() -> None:
    load_settings(ChatSettings)  # Still validates configuration, so deploy manifests can be checked.
    sys.exit(NOT_BUILT)


def worker() -> None:
    load_settings(ChatSettings)
    sys.exit(NOT_BUILT)
