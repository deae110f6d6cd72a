"""Bearer tokens: HS256-signed JWTs naming a subject (user or client id) and its scopes."""

from __future__ import annotations

import contextvars
import time
from dataclasses import dataclass

import jwt

from emili_core.errors import PermissionDenied, Unauthenticated

ADMIN_SCOPE = "admin"
KNOWN_SCOPES = frozenset({"admin", "chat", "fer", "labeler", "trainer", "pipeline"})
_ALGORITHM = "HS256"


@dataclass(frozen=True)
class Principal:
    subject: str
    scopes: frozenset[str]

    @property
    def is_admin(self) -> bool:
        return ADMIN_SCOPE in self.scopes

    def require(self, scope: str) -> None:
        if scope not in self.scopes and not self.is_admin:
            raise PermissionDenied(f"token of {self.subject!r} lacks the {scope!r} scope")


_current_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("principal", default=None)


def current_principal() -> Principal:
    """The caller of the RPC being served; set by the auth interceptor."""
    principal = _current_principal.get()
    if principal is None:
        raise Unauthenticated("no authenticated caller in this context")
    return principal


def set_current_principal(principal: Principal | None) -> contextvars.Token[Principal | None]:
    return _current_principal.set(principal)


def create_token(secret: str, subject: str, scopes: list[str], ttl_seconds: int, issuer: str = "emili") -> str:
    if not subject:
        raise ValueError("a token needs a subject (user or client id)")
    unknown = set(scopes) - KNOWN_SCOPES
    if unknown:
        raise ValueError(f"unknown scopes {sorted(unknown)}; known: {sorted(KNOWN_SCOPES)}")
    now = int(time.time())
    claims = {"sub": subject, "scopes": sorted(set(scopes)), "iat": now, "exp": now + ttl_seconds, "iss": issuer}
    return jwt.encode(claims, secret, algorithm=_ALGORITHM)


def verify_token(secret: str, token: str, issuer: str = "emili") -> Principal:
    try:
        claims = jwt.decode(
            token, secret, algorithms=[_ALGORITHM], issuer=issuer, options={"require": ["sub", "exp", "iss"]}
        )
    except jwt.ExpiredSignatureError:
        raise Unauthenticated("token expired; create a new one with `emili token create`") from None
    except jwt.InvalidTokenError as exc:
        raise Unauthenticated(f"invalid token: {exc}") from None
    scopes = claims.get("scopes", [])
    if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
        raise Unauthenticated("invalid token: scopes must be a list of strings")
    return Principal(subject=str(claims["sub"]), scopes=frozenset(scopes))


def principal_from_metadata(
    secret: str, metadata: tuple[tuple[str, str | bytes], ...] | None, issuer: str
) -> Principal:
    values = [v for k, v in (metadata or ()) if k == "authorization"]
    if not values:
        raise Unauthenticated(
            "missing 'authorization: Bearer <token>' metadata; create a token with `emili token create`"
        )
    value = values[0].decode() if isinstance(values[0], bytes) else values[0]
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated("authorization metadata must be 'Bearer <token>'")
    return verify_token(secret, token.strip(), issuer)
