from __future__ import annotations

import time

import jwt
import pytest

from emili_core.auth import create_token, principal_from_metadata, verify_token
from emili_core.errors import PermissionDenied, Unauthenticated

SECRET = "s" * 40


def test_round_trip_carries_subject_and_scopes() -> None:
    principal = verify_token(SECRET, create_token(SECRET, "user-1", ["chat"], 60))
    assert principal.subject == "user-1"
    assert principal.scopes == {"chat"}
    principal.require("chat")
    with pytest.raises(PermissionDenied, match="lacks the 'trainer' scope"):
        principal.require("trainer")


def test_admin_has_every_scope() -> None:
    verify_token(SECRET, create_token(SECRET, "ops", ["admin"], 60)).require("trainer")


def test_wrong_secret_and_expiry_are_rejected() -> None:
    with pytest.raises(Unauthenticated, match="invalid token"):
        verify_token("other" * 10, create_token(SECRET, "user-1", ["chat"], 60))
    expired = jwt.encode({"sub": "u", "scopes": [], "exp": int(time.time()) - 5, "iss": "emili"}, SECRET, "HS256")
    with pytest.raises(Unauthenticated, match="expired"):
        verify_token(SECRET, expired)


def test_unsigned_token_is_rejected() -> None:
    unsigned = jwt.encode({"sub": "u", "scopes": ["admin"], "exp": int(time.time()) + 60, "iss": "emili"}, None, "none")
    with pytest.raises(Unauthenticated):
        verify_token(SECRET, unsigned)


def test_unknown_scope_cannot_be_issued() -> None:
    with pytest.raises(ValueError, match="unknown scopes"):
        create_token(SECRET, "u", ["root"], 60)


def test_metadata_parsing() -> None:
    token = create_token(SECRET, "user-1", ["chat"], 60)
    assert principal_from_metadata(SECRET, (("authorization", f"Bearer {token}"),), "emili").subject == "user-1"
    with pytest.raises(Unauthenticated, match="missing"):
        principal_from_metadata(SECRET, (), "emili")
    with pytest.raises(Unauthenticated, match="Bearer"):
        principal_from_metadata(SECRET, (("authorization", token),), "emili")
