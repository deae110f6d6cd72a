"""Repository-wide pytest set-up: EMILI's fixtures and hooks live in emili_core.testing."""

pytest_plugins = ["emili_core.testing"]
