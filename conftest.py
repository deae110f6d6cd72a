"""Repository-wide pytest set-up: EMILI's fixtures and hooks live in emili_testing.plugin."""

pytest_plugins = ["emili_testing.plugin"]
