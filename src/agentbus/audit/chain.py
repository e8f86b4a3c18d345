"""The hash chain over a stream, and signed checkpoints of it. Pure: no I/O.

Definitions (docs/audit.md repeats them for anyone re-implementing a verifier):

- `digest = SHA-256(payload)`: the message's stored bytes, exactly as JetStream holds them
  (ciphertext stays ciphertext; nothing is decoded).
- `genesis(stream) = SHA-256("agentbus-audit-chain/v1" 0x00 stream-name-utf8)`.
- `link(previous, position, subject, payload) = SHA-256(previous (32 bytes) ||
  position (8 bytes, unsigned big-endian) || len(subject) (4 bytes, unsigned big-endian) ||
  subject (utf-8) || digest (32 bytes))`.

The first event of the stream is chained to the genesis link; every later one to the link of
the event before it *on the stream*, whatever its position: a position the notary never saw
(a gap) is committed to by the next link, since the link covers the position.

A checkpoint (stream, position, link, time) is signed with Ed25519 over its canonical bytes
(`checkpoint_message`), so a witness holding the public key and a copy of the checkpoints can
tell whether the history up to each checkpoint is still the one that was signed.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

CHAIN_VERSION: Final = b"agentbus-audit-chain/v1"
CHECKPOINT_VERSION: Final = "agentbus-audit-checkpoint/v1"
LINK_SIZE: Final = 32
_MAX_POSITION: Final = (1 << 64) - 1
_sha256 = hashlib.sha256


def genesis(stream: str) -> bytes:
    """The link before a stream's first event: binds the chain to the stream's name."""
    return _sha256(CHAIN_VERSION + b"\x00" + stream.encode()).digest()


def payload_digest(payload: bytes) -> bytes:
    """SHA-256 of a message's stored bytes (kept per position to tell moved events apart)."""
    return _sha256(payload).digest()


def link(previous: bytes, position: int, subject: str, payload: bytes) -> bytes:
    """The link of the event at `position` on `subject` with stored bytes `payload`, following
    the link `previous` (the link of the event before it, or the genesis link)."""
    return link_of_digest(previous, position, subject, _sha256(payload).digest())


def link_of_digest(previous: bytes, position: int, subject: str, digest: bytes) -> bytes:
    """`link`, given the payload's digest instead of the payload."""
    if len(previous) != LINK_SIZE:
        raise ValueError(f"a previous link has {LINK_SIZE} bytes, got {len(previous)}")
    if not 0 < position <= _MAX_POSITION:
        raise ValueError(f"positions are 1..2**64-1, got {position}")
    encoded = subject.encode()
    return _sha256(
        previous + position.to_bytes(8, "big") + len(encoded).to_bytes(4, "big") + encoded + digest
    ).digest()


# --------------------------------------------------------------------------- checkpoints


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A signed statement: on `stream`, the chain's link at `position` was `link` at `time`."""

    stream: str
    position: int
    link: bytes
    time: datetime
    key_id: str
    signature: bytes

    def message(self) -> bytes:
        return checkpoint_message(self.stream, self.position, self.link, self.time)

    def to_json(self) -> dict[str, object]:
        """The witness export format (one JSON object per line)."""
        return {
            "stream": self.stream,
            "position": self.position,
            "link": self.link.hex(),
            "time": format_time(self.time),
            "key_id": self.key_id,
            "signature": base64.b64encode(self.signature).decode(),
        }

    @classmethod
    def from_json(cls, value: dict[str, object]) -> Checkpoint:
        """Read one exported checkpoint; `ValueError` naming the field that is wrong."""
        try:
            position = value["position"]
            if not isinstance(position, int) or isinstance(position, bool):
                raise ValueError("position must be an integer")
            link_bytes = bytes.fromhex(str(value["link"]))
            if len(link_bytes) != LINK_SIZE:
                raise ValueError(f"link must be {LINK_SIZE} bytes of hex")
            return cls(
                stream=str(value["stream"]),
                position=position,
                link=link_bytes,
                time=parse_time(str(value["time"])),
                key_id=str(value["key_id"]),
                signature=base64.b64decode(str(value["signature"]), validate=True),
            )
        except KeyError as exc:
            raise ValueError(f"checkpoint lacks {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:  # binascii.Error is a ValueError
            raise ValueError(f"malformed checkpoint: {exc}") from None


def format_time(time: datetime) -> str:
    """RFC 3339, UTC, microseconds, `Z`: `2026-11-21T09:12:00.000000Z`."""
    if time.tzinfo is None:
        raise ValueError("checkpoint times must be timezone-aware")
    return time.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


def checkpoint_message(stream: str, position: int, link_value: bytes, time: datetime) -> bytes:
    """The canonical bytes a checkpoint's signature covers (UTF-8, one field per line)."""
    return (
        f"{CHECKPOINT_VERSION}\n"
        f"stream={stream}\n"
        f"position={position}\n"
        f"link={link_value.hex()}\n"
        f"time={format_time(time)}\n"
    ).encode()


# --------------------------------------------------------------------------- keys


@dataclass(frozen=True, slots=True)
class NotaryKey:
    """The notary's Ed25519 key pair, from a persisted 32-byte seed."""

    private: Ed25519PrivateKey

    @classmethod
    def from_seed(cls, seed: bytes) -> NotaryKey:
        if len(seed) != 32:
            raise ValueError(f"an Ed25519 seed has 32 bytes, got {len(seed)}")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @property
    def public(self) -> Ed25519PublicKey:
        return self.private.public_key()

    @property
    def key_id(self) -> str:
        return key_id(self.public)

    def sign(self, stream: str, position: int, link_value: bytes, time: datetime) -> Checkpoint:
        time = datetime.fromisoformat(format_time(time).replace("Z", "+00:00"))  # µs, UTC
        signature = self.private.sign(checkpoint_message(stream, position, link_value, time))
        return Checkpoint(stream, position, link_value, time, self.key_id, signature)


def key_id(public: Ed25519PublicKey) -> str:
    """First 16 hex digits of SHA-256 of the raw 32-byte public key."""
    return _sha256(raw_public_key(public)).hexdigest()[:16]


def raw_public_key(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_pem(public: Ed25519PublicKey) -> str:
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def load_public_key(data: bytes) -> Ed25519PublicKey:
    """A public key from PEM (SubjectPublicKeyInfo), 64 hex digits, or 32 raw bytes."""
    text = data.strip()
    if text.startswith(b"-----BEGIN"):
        key = serialization.load_pem_public_key(text)
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("the PEM file holds a public key that is not Ed25519")
        return key
    raw = data if len(data) == 32 else bytes.fromhex(text.decode())
    if len(raw) != 32:
        raise ValueError("an Ed25519 public key is PEM, 64 hex digits or 32 raw bytes")
    return Ed25519PublicKey.from_public_bytes(raw)


SignatureProblem = Literal["unknown-key", "bad-signature"]


def signature_problem(checkpoint: Checkpoint, public: Ed25519PublicKey) -> SignatureProblem | None:
    """None when `public` made the checkpoint's signature; else what is wrong with it."""
    if checkpoint.key_id != key_id(public):
        return "unknown-key"
    try:
        public.verify(checkpoint.signature, checkpoint.message())
    except InvalidSignature:
        return "bad-signature"
    return None
