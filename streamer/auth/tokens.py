"""Access tokens: JWTs signed with HS256 whose `sub` is the user id."""

from __future__ import annotations

import time
from dataclasses import dataclass

import jwt

ALGORITHMS = ("HS256",)
DEFAULT_TTL_S = 3600
MAX_TOKEN_LENGTH = 4096
# The end of year 9999: later (or non-numeric) times are not dates a token can carry.
MAX_TIMESTAMP = 253_402_300_799
TIME_CLAIMS = ("exp", "iat", "nbf")


class InvalidToken(Exception):
    """Missing, malformed, badly signed or expired credentials."""


@dataclass(frozen=True)
class Identity:
    user_id: str
    expires_at: float


def issue_token(secret: str, user_id: str, ttl_s: int = DEFAULT_TTL_S) -> str:
    if not user_id:
        raise ValueError("user_id must not be empty")
    if ttl_s <= 0:
        raise ValueError("ttl must be positive")
    now = int(time.time())
    return jwt.encode(
        {"sub": str(user_id), "iat": now, "exp": now + ttl_s}, secret, algorithm="HS256"
    )


def verify_token(secret: str, token: str) -> Identity:
    # A JWT is ASCII; other bytes of a header arrive as surrogates, which PyJWT cannot
    # even encode.
    if not token or len(token) > MAX_TOKEN_LENGTH or not token.isascii():
        raise InvalidToken("malformed token")
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=list(ALGORITHMS),
            options={"require": ["sub", "exp"]},
        )
    except jwt.ExpiredSignatureError:
        raise InvalidToken("token expired") from None
    except jwt.InvalidTokenError as exc:
        raise InvalidToken(f"invalid token: {exc}") from None
    for name in TIME_CLAIMS:
        if name in claims and not _is_timestamp(claims[name]):
            raise InvalidToken(f"invalid token: {name} is not a time")
    subject = claims["sub"]
    if not isinstance(subject, str) or not subject or len(subject) > 200:
        raise InvalidToken("invalid token: bad subject")
    if any(ord(ch) < 32 for ch in subject) or not subject.isprintable():
        raise InvalidToken("invalid token: bad subject")
    return Identity(user_id=subject, expires_at=float(claims["exp"]))


def _is_timestamp(value: object) -> bool:
    """A JSON number of seconds since 1970 that a float holds; PyJWT also takes strings
    and integers of any size, which would overflow (a 500) where the time is used."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return 0 <= value <= MAX_TIMESTAMP
