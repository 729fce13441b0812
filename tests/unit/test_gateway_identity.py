"""The gateway's authenticator: verified tokens are remembered, never beyond their expiry,
never in place of the revocation list, and only by their exact text; a store that lost
the revocation list is not believed."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.identity import Authenticator
from shared.auth import (
    LEEWAY_SECONDS,
    REVOCATIONS_RESTORED_KEY,
    Identity,
    TokenSigner,
    TokenVerifier,
    revoked_token_key,
)
from shared.errors import ServiceUnavailableError, UnauthorizedError
from shared.kv import KeyValueStore, open_kv


@pytest.fixture
async def kv() -> AsyncIterator[KeyValueStore]:
    store = await open_kv(f"memory://identity-{secrets.token_hex(4)}", "test")
    yield store
    await store.close()


def _keys() -> tuple[TokenSigner, TokenVerifier]:
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    signer = TokenSigner(private)
    return signer, TokenVerifier(signer.public_key_pem())


def _bearer(token: str) -> web.Request:
    return make_mocked_request(
        "GET", "/api/v1/users/me", headers={"Authorization": f"Bearer {token}"}
    )


class _CountingVerifier(TokenVerifier):
    """Answers a fixed identity, or refuses as expired once told to; counts its calls."""

    def __init__(self, expires_at: int) -> None:
        self.calls = 0
        self.expired = False
        self.expires_at = expires_at

    def verify(self, token: str) -> Identity:
        self.calls += 1
        if self.expired:
            raise UnauthorizedError("The access token has expired.", code="token_expired")
        return Identity("u1", "ann", f"jti-{token}", "fam", self.expires_at)


async def test_a_remembered_token_is_refused_once_the_verifier_would_call_it_expired(
    kv: KeyValueStore,
) -> None:
    now = [1000.0]
    verifier = _CountingVerifier(expires_at=1000)
    authenticator = Authenticator(verifier, kv, clock=lambda: now[0])

    assert await authenticator.authenticate(_bearer("t"), websocket=False) is not None
    now[0] = 1000 + LEEWAY_SECONDS - 0.5  # still inside the leeway: no second check
    assert await authenticator.authenticate(_bearer("t"), websocket=False) is not None
    assert verifier.calls == 1

    now[0] = 1000 + LEEWAY_SECONDS
    verifier.expired = True
    with pytest.raises(UnauthorizedError) as refused:
        await authenticator.authenticate(_bearer("t"), websocket=False)
    assert refused.value.instance_code == "token_expired"
    assert verifier.calls == 2


async def test_signing_out_refuses_a_token_verified_before(kv: KeyValueStore) -> None:
    signer, verifier = _keys()
    token, identity = signer.issue(user_id="u1", username="ann", family_id="fam")
    authenticator = Authenticator(verifier, kv)
    assert await authenticator.authenticate(_bearer(token), websocket=False) == identity

    await kv.set(revoked_token_key(identity.token_id), "1")
    with pytest.raises(UnauthorizedError) as refused:
        await authenticator.authenticate(_bearer(token), websocket=False)
    assert refused.value.instance_code == "token_revoked"


async def test_only_the_exact_token_text_is_remembered(kv: KeyValueStore) -> None:
    signer, verifier = _keys()
    token, _ = signer.issue(user_id="u1", username="ann", family_id="fam")
    authenticator = Authenticator(verifier, kv)
    await authenticator.authenticate(_bearer(token), websocket=False)

    header, payload, signature = token.split(".")
    forged = f"{header}.{payload}.{'A' if signature[0] != 'A' else 'B'}{signature[1:]}"
    with pytest.raises(UnauthorizedError) as refused:
        await authenticator.authenticate(_bearer(forged), websocket=False)
    assert refused.value.instance_code == "token_invalid"


async def test_memory_stays_bounded_whatever_the_number_of_tokens(kv: KeyValueStore) -> None:
    verifier = _CountingVerifier(expires_at=2**40)
    authenticator = Authenticator(verifier, kv, capacity=2)
    for token in ("a", "b", "c"):  # "a" is forgotten to make room for "c"
        await authenticator.authenticate(_bearer(token), websocket=False)
    await authenticator.authenticate(_bearer("c"), websocket=False)
    assert verifier.calls == 3
    await authenticator.authenticate(_bearer("a"), websocket=False)
    assert verifier.calls == 4


async def test_a_store_that_lost_the_revocation_list_is_not_believed(kv: KeyValueStore) -> None:
    signer, verifier = _keys()
    token, identity = signer.issue(user_id="u1", username="ann", family_id="fam")
    authenticator = Authenticator(verifier, kv)
    await kv.set(REVOCATIONS_RESTORED_KEY, "restored")
    assert await authenticator.authenticate(_bearer(token), websocket=False) == identity

    # Redis restarted empty (or was flushed): until the api has copied the revocations
    # back, a token may be signed out without the store knowing.
    await kv.delete(REVOCATIONS_RESTORED_KEY)
    with pytest.raises(ServiceUnavailableError) as refused:
        await authenticator.authenticate(_bearer(token), websocket=False)
    assert refused.value.instance_code == "revocations_restoring"
    assert refused.value.headers["Retry-After"] == "1"

    await kv.set(REVOCATIONS_RESTORED_KEY, "restored")
    assert await authenticator.authenticate(_bearer(token), websocket=False) == identity


async def test_a_gateway_that_never_saw_the_list_restored_trusts_the_store(
    kv: KeyValueStore,
) -> None:
    # A gateway in front of upstreams that do not restore revocations (no api yet).
    signer, verifier = _keys()
    token, identity = signer.issue(user_id="u1", username="ann", family_id="fam")
    assert await Authenticator(verifier, kv).authenticate(_bearer(token), websocket=False) == (
        identity
    )
