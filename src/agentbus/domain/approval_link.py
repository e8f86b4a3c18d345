"""Signed approval links: whoever holds one may make exactly the decision it allows, once.

A link is a JWT (RFC 7519) signed with HS256 (HMAC-SHA-256), written here with the standard
library (no JWT dependency): header `{"alg": "HS256", "typ": "JWT", "kid": <key id>}`, claims

    iss "agentbus"   sub <approval id>   ws <workspace>   decision granted|denied
    act <who decides through it>   iat, exp <Unix seconds>   jti <unique id>

Verification accepts only HS256 (no `none`, no algorithm from the token), a known `kid` (the
current key or a kept previous one, so links survive a rotation until their expiry), a constant-
time signature match, and an unexpired `exp`. Single use is the approval's business: the decision
records the `jti`, and the approval refuses a second use (`LinkAlreadyUsed`).

Pure: the keys are passed in (`agentbus.runtime.link_keys` keeps them in JetStream KV).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, get_args

import orjson

from agentbus.domain.decider import DomainError
from agentbus.events.approval import Decision

ISSUER = "agentbus"
MAX_TOKEN = 2048


class LinkInvalid(DomainError):
    """Not a link agentbus signed (malformed, tampered with, unknown key)."""


class LinkExpired(DomainError):
    """A link used after its `exp`."""


class LinkMismatch(DomainError):
    """A link used for a decision other than the one it allows."""


@dataclass(frozen=True, slots=True)
class LinkClaims:
    workspace: str
    approval_id: str
    decision: Decision
    by: str
    """Who decides through the link (recorded as the decision's `by`)."""
    issued_at: int
    expires_at: int
    jti: str

    @classmethod
    def new(
        cls,
        workspace: str,
        approval_id: str,
        decision: Decision,
        by: str,
        expires_at: datetime,
        now: datetime | None = None,
    ) -> LinkClaims:
        issued = int((now or datetime.now(UTC)).timestamp())
        return cls(
            workspace,
            approval_id,
            decision,
            by,
            issued,
            int(expires_at.timestamp()),
            secrets.token_urlsafe(16),
        )

    @property
    def expiry(self) -> datetime:
        return datetime.fromtimestamp(self.expires_at, UTC)


def sign_link(claims: LinkClaims, key: bytes, kid: str) -> str:
    """The token for `claims`, signed with `key` (named `kid`)."""
    header = {"alg": "HS256", "typ": "JWT", "kid": kid}
    payload = {
        "iss": ISSUER,
        "sub": claims.approval_id,
        "ws": claims.workspace,
        "decision": claims.decision,
        "act": claims.by,
        "iat": claims.issued_at,
        "exp": claims.expires_at,
        "jti": claims.jti,
    }
    signing_input = f"{_b64(orjson.dumps(header))}.{_b64(orjson.dumps(payload))}"
    return f"{signing_input}.{_b64(_mac(key, signing_input))}"


def verify_link(token: str, keys: Mapping[str, bytes], now: datetime | None = None) -> LinkClaims:
    """The claims of a link signed with one of `keys` (by kid). `LinkInvalid` for anything
    agentbus did not sign as it is; `LinkExpired` once its `exp` has passed."""
    if len(token) > MAX_TOKEN or token.count(".") != 2:
        raise LinkInvalid("not an approval link")
    header_part, payload_part, signature_part = token.split(".")
    header = _json(header_part)
    if header.get("alg") != "HS256" or header.get("typ", "JWT") != "JWT":
        raise LinkInvalid("not an approval link (only HS256 links are accepted)")
    kid = header.get("kid")
    key = keys.get(kid) if isinstance(kid, str) else None
    if key is None:
        raise LinkInvalid("the link was signed with an unknown or retired key")
    expected = _mac(key, f"{header_part}.{payload_part}")
    if not hmac.compare_digest(expected, _unb64(signature_part)):
        raise LinkInvalid("the link's signature does not match: it was altered")
    payload = _json(payload_part)
    try:
        claims = LinkClaims(
            workspace=_str(payload, "ws"),
            approval_id=_str(payload, "sub"),
            decision=_decision(payload.get("decision")),
            by=_str(payload, "act"),
            issued_at=_int(payload, "iat"),
            expires_at=_int(payload, "exp"),
            jti=_str(payload, "jti"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise LinkInvalid(f"the link's claims are incomplete: {exc}") from None
    if payload.get("iss") != ISSUER:
        raise LinkInvalid("the link was not issued by agentbus")
    if (now or datetime.now(UTC)).timestamp() >= claims.expires_at:
        raise LinkExpired(f"the link expired at {claims.expiry.isoformat()}")
    return claims


def _mac(key: bytes, signing_input: str) -> bytes:
    return hmac.new(key, signing_input.encode(), hashlib.sha256).digest()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise LinkInvalid("not an approval link (bad base64url)") from None


def _json(part: str) -> dict[str, Any]:
    try:
        value = orjson.loads(_unb64(part))
    except orjson.JSONDecodeError:
        raise LinkInvalid("not an approval link (bad JSON)") from None
    if not isinstance(value, dict):
        raise LinkInvalid("not an approval link (not a JSON object)")
    return value


def _str(payload: Mapping[str, Any], name: str) -> str:
    value = payload[name]
    if not isinstance(value, str) or not value:
        raise TypeError(f"{name} must be a non-empty string")
    return value


def _int(payload: Mapping[str, Any], name: str) -> int:
    value = payload[name]
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an integer")
    return value


def _decision(value: object) -> Decision:
    if value == "granted":
        return "granted"
    if value == "denied":
        return "denied"
    raise ValueError(f"decision must be one of {get_args(Decision)}")
