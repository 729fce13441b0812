"""Access tokens: EdDSA-signed JWTs. api_service signs, the gateway verifies.

The gateway holds only the public key; it pins the algorithm (so ``alg: none`` and the
HS256-with-the-public-key trick are refused) and checks ``exp``, ``iat``, ``iss`` and
``aud``. Revocation (logout, refresh-token theft) is a Redis lookup done by the gateway
through ``revoked_token_key`` / ``revoked_family_key``. No aiohttp in this module.

The verified identity crosses the gateway → upstream hop as the ``X-User-*`` /
``X-Token-*`` headers below; upstreams trust them only next to the internal token.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.errors import ConfigError, UnauthorizedError

ALGORITHM = "EdDSA"
ISSUER = "vod"
AUDIENCE = "vod-api"
ACCESS_TOKEN_SECONDS = 15 * 60
REFRESH_TOKEN_SECONDS = 7 * 24 * 3600
# Clock skew tolerated between the api replica that signed and the gateway that checks.
LEEWAY_SECONDS = 10

USER_ID_HEADER = "X-User-Id"
USERNAME_HEADER = "X-Username"
TOKEN_ID_HEADER = "X-Token-Id"  # noqa: S105 - a header name
TOKEN_FAMILY_HEADER = "X-Token-Family"  # noqa: S105 - a header name
TOKEN_EXPIRES_HEADER = "X-Token-Expires"  # noqa: S105 - a header name
# Every header that carries identity; the gateway drops all of them from client requests.
IDENTITY_HEADERS = (
    USER_ID_HEADER,
    USERNAME_HEADER,
    TOKEN_ID_HEADER,
    TOKEN_FAMILY_HEADER,
    TOKEN_EXPIRES_HEADER,
)


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a verified access token belongs to, and which token it was."""

    user_id: str
    username: str
    token_id: str
    family_id: str
    expires_at: int

    def to_headers(self) -> dict[str, str]:
        return {
            USER_ID_HEADER: self.user_id,
            USERNAME_HEADER: self.username,
            TOKEN_ID_HEADER: self.token_id,
            TOKEN_FAMILY_HEADER: self.family_id,
            TOKEN_EXPIRES_HEADER: str(self.expires_at),
        }

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> Identity | None:
        """The identity the gateway forwarded, or None for an anonymous request."""
        user_id = headers.get(USER_ID_HEADER)
        if not user_id:
            return None
        try:
            expires_at = int(headers.get(TOKEN_EXPIRES_HEADER, "0"))
        except ValueError:
            expires_at = 0
        return cls(
            user_id=user_id,
            username=headers.get(USERNAME_HEADER, ""),
            token_id=headers.get(TOKEN_ID_HEADER, ""),
            family_id=headers.get(TOKEN_FAMILY_HEADER, ""),
            expires_at=expires_at,
        )


def revoked_token_key(token_id: str) -> str:
    return f"revoked:jti:{token_id}"


def revoked_family_key(family_id: str) -> str:
    return f"revoked:family:{family_id}"


# Published "<kind> <subject>" (kind: jti, family or user) after each revocation is
# stored, so every api replica ends the live sockets opened with a token it names.
REVOCATIONS_CHANNEL = "revoked"
# Set once the store holds every revocation still in force (restored from the
# database); a store that lacks it is new, restarted empty or flushed.
REVOCATIONS_RESTORED_KEY = "revoked:restored"


class TokenSigner:
    """Signs access tokens with the private key (api_service only)."""

    def __init__(self, private_key_pem: str, *, lifetime: int = ACCESS_TOKEN_SECONDS) -> None:
        key = serialization.load_pem_private_key(private_key_pem.encode(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError("VOD_JWT_PRIVATE_KEY", "must be an Ed25519 private key (PEM)")
        self._key = key
        self.lifetime = lifetime

    def public_key_pem(self) -> str:
        return (
            self._key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )

    def issue(self, *, user_id: str, username: str, family_id: str) -> tuple[str, Identity]:
        now = int(time.time())
        identity = Identity(
            user_id=user_id,
            username=username,
            token_id=uuid.uuid4().hex,
            family_id=family_id,
            expires_at=now + self.lifetime,
        )
        claims: dict[str, Any] = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": user_id,
            "name": username,
            "jti": identity.token_id,
            "fam": family_id,
            "iat": now,
            "nbf": now,
            "exp": identity.expires_at,
        }
        return jwt.encode(claims, self._key, algorithm=ALGORITHM), identity


class TokenVerifier:
    """Verifies access tokens with the public key (the gateway)."""

    def __init__(self, public_key_pem: str) -> None:
        key = serialization.load_pem_public_key(public_key_pem.encode())
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigError("VOD_JWT_PUBLIC_KEY", "must be an Ed25519 public key (PEM)")
        self._key = key

    def verify(self, token: str) -> Identity:
        """The token's identity; ``UnauthorizedError`` for anything not perfectly valid."""
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=[ALGORITHM],  # pinned: the header's alg is never trusted
                audience=AUDIENCE,
                issuer=ISSUER,
                leeway=LEEWAY_SECONDS,
                options={"require": ["exp", "iat", "iss", "aud", "sub", "jti", "fam"]},
            )
        except jwt.ExpiredSignatureError:
            raise UnauthorizedError("The access token has expired.", code="token_expired") from None
        except jwt.PyJWTError:
            raise UnauthorizedError(
                "The access token is not valid.", code="token_invalid"
            ) from None
        if claims["iat"] > time.time() + LEEWAY_SECONDS:
            raise UnauthorizedError("The access token is not valid.", code="token_invalid")
        return Identity(
            user_id=str(claims["sub"]),
            username=str(claims.get("name", "")),
            token_id=str(claims["jti"]),
            family_id=str(claims["fam"]),
            expires_at=int(claims["exp"]),
        )


def ensure_dev_keypair(var_dir: Path) -> tuple[str, str]:
    """Standalone mode: an Ed25519 pair under ``var_dir``, made on first run, then reused."""
    private_path = var_dir / "jwt-ed25519-private.pem"
    public_path = var_dir / "jwt-ed25519-public.pem"
    if not private_path.exists():
        var_dir.mkdir(parents=True, exist_ok=True)
        key = Ed25519PrivateKey.generate()
        private_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # Written 0600 from the first byte: never world-readable, not even for a moment.
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(private_pem)
        public_path.write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
    return private_path.read_text(), public_path.read_text()
