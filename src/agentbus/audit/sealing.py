"""Sealing personal fields (pure): AES-256-GCM with one key per data subject.

A sealed field is still a JSON string, so an event's JSON Schema type does not change:

    sealed:v1:<key id>:<base64(nonce | ciphertext | tag)>

- `key id`: 16 hex characters, random per key. A subject forgotten and seen again gets a new
  key with a new id, so old ciphertexts never meet the new key.
- the nonce is 12 random bytes per field; the additional authenticated data binds the
  ciphertext to its event id and field name: moved to another event or field, it does not open
  (`SealBroken`), which is tampering, not erasure.
- a key that was destroyed opens as `ERASED`, which satisfies every personal field's
  constraints (non-empty, short).

Only the fields an event type declares (`agentbus.events.privacy.Personal`) are sealed or
opened; every other field, and every event type without a declaration, is left alone.
"""

from __future__ import annotations

import binascii
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agentbus.errors import SealBroken, SubjectKeyUnavailable
from agentbus.events.privacy import Personal

PREFIX: Final = "sealed:v1:"
ERASED: Final = "[erased]"
KEY_BYTES: Final = 32  # AES-256
KEY_ID_BYTES: Final = 8
_NONCE_BYTES: Final = 12
_AAD_PREFIX: Final = b"agentbus/sealed/v1\x00"
_ID_END: Final = len(PREFIX) + 2 * KEY_ID_BYTES
KEY_IDS_IN_PAYLOAD: Final = re.compile(rb'"sealed:v1:([0-9a-f]{16}):')
"""Finds the key ids of a raw CloudEvent's sealed fields without parsing its JSON."""
SEALED_MARK: Final = b'"sealed:v1:'


@dataclass(frozen=True, slots=True)
class SubjectKey:
    """One data subject's key: its id and a ready AES-GCM cipher."""

    key_id: str
    cipher: AESGCM

    @staticmethod
    def generate() -> bytes:
        """A new key as stored: 8 bytes of id, then 32 bytes of AES-256 key."""
        return secrets.token_bytes(KEY_ID_BYTES + KEY_BYTES)

    @classmethod
    def from_stored(cls, value: bytes) -> SubjectKey:
        if len(value) != KEY_ID_BYTES + KEY_BYTES:
            raise ValueError(f"a stored subject key has {KEY_ID_BYTES + KEY_BYTES} bytes")
        return cls(value[:KEY_ID_BYTES].hex(), AESGCM(value[KEY_ID_BYTES:]))


def _aad(event_id: str, field: str) -> bytes:
    return _AAD_PREFIX + event_id.encode() + b"\x00" + field.encode()


def seal_value(key: SubjectKey, event_id: str, field: str, plaintext: str) -> str:
    """`plaintext` sealed for field `field` of event `event_id`."""
    nonce = os.urandom(_NONCE_BYTES)
    sealed = key.cipher.encrypt(nonce, plaintext.encode(), _aad(event_id, field))
    # binascii's base64 (standard alphabet, padded): ~1 µs less per field than urlsafe's.
    blob = binascii.b2a_base64(nonce + sealed, newline=False).decode("ascii")
    return f"{PREFIX}{key.key_id}:{blob}"


def sealed_key_id(value: object) -> str | None:
    """The key id of a sealed value; None when `value` is not one (plaintext)."""
    if (
        isinstance(value, str)
        and value.startswith(PREFIX)
        and len(value) > _ID_END
        and value[_ID_END] == ":"
    ):
        return value[len(PREFIX) : _ID_END]
    return None


def open_value(key: SubjectKey | None, event_id: str, field: str, value: str) -> str:
    """The plaintext of a sealed value; `ERASED` when its key was destroyed (`key` None).
    Raises `SealBroken` when the key is there and the value does not open with it."""
    if key is None:
        return ERASED
    try:
        raw = binascii.a2b_base64(value[_ID_END + 1 :], strict_mode=True)
        opened = key.cipher.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], _aad(event_id, field))
        return opened.decode()
    except (InvalidTag, ValueError, binascii.Error) as exc:
        raise SealBroken(
            f"field {field!r} of event {event_id} does not open with key {key.key_id}: "
            "altered, or moved from another event or field"
        ) from exc


def seal_data(
    personal: Personal, key: SubjectKey, event_id: str, data: dict[str, Any]
) -> dict[str, Any]:
    """Seal the personal fields of one event's `data` (JSON form) in place; returns `data`."""
    for field in personal.fields:
        value = data.get(field)
        if isinstance(value, str):
            data[field] = seal_value(key, event_id, field, value)
    return data


def open_data(
    personal: Personal,
    keys: Mapping[str, SubjectKey | None],
    event_id: str,
    data: dict[str, Any],
) -> dict[str, Any]:
    """Open the sealed personal fields of one event's `data` in place; returns `data`.

    `keys`: key id -> its key, or None for a key known to be destroyed. A key id missing from
    `keys` raises `SubjectKeyUnavailable` (the caller loads it and tries again). Plaintext
    values (written before sealing, or with sealing off) are left as they are."""
    for field in personal.fields:
        value = data.get(field)
        key_id = sealed_key_id(value)
        if key_id is None:
            continue
        try:
            key = keys[key_id]
        except KeyError:
            raise SubjectKeyUnavailable(
                f"key {key_id} of event {event_id} is not loaded yet; retry"
            ) from None
        assert isinstance(value, str)
        data[field] = open_value(key, event_id, field, value)
    return data
