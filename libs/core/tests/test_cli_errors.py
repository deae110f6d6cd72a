"""`emili` ends a command that meets a domain error with its message and exit status 1, not a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import redis

from emili_core import cli
from emili_core.errors import DependencyUnavailable, InvalidInput


def test_an_unreachable_object_store_is_named_with_what_to_do() -> None:
    env = {**os.environ, "EMILI_S3__ENDPOINT": "127.0.0.1:1", "EMILI_S3__MAX_ATTEMPTS": "1"}
    run = subprocess.run(
        [sys.executable, "-c", "from emili_core.cli import main; main()", "retention", "sweep", "--local"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1
    assert "object store at 127.0.0.1:1" in run.stderr and "make up" in run.stderr
    assert "Traceback" not in run.stderr and "╭" not in run.stderr


@pytest.mark.parametrize(
    ("error", "hint"),
    [
        (DependencyUnavailable("redis is down"), True),
        (InvalidInput("bad version name"), False),
        (InvalidInput("no key [/var/x] in [frames]"), False),  # Printed as written, not read as Rich markup.
        (redis.exceptions.AuthenticationError("invalid password"), False),  # Reached, refused: no "is it up?".
    ],
)
def test_domain_errors_exit_1_with_their_message(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], error: Exception, hint: bool
) -> None:
    def fail() -> None:
        raise error

    monkeypatch.setattr(cli, "_load_plugins", lambda: None)
    monkeypatch.setattr(cli, "app", fail)
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 1
    err = capsys.readouterr().err
    assert str(error) in err and ("make up" in err) == hint
