"""Who is calling: the one place where the gateway decides a request's identity.

Upstreams trust the ``X-User-*`` / ``X-Token-*`` headers only because the gateway strips
whatever a client sent under those names and sets them solely from what ``authenticate``
returns: a token whose signature (Ed25519, algorithm pinned), ``exp``, ``iat``, ``iss``
and ``aud`` check out, and that is not on the revocation list in Redis.

The revocation list is only as good as the store holding it: the api copies it back from
the database into a store that lost it and then sets ``REVOCATIONS_RESTORED_KEY``. Once
this gateway has seen that marker, a store without it has come back empty (a restart, a
flush) and is not believed: signed requests are 503 until the api has restored it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

from aiohttp import hdrs, web

from shared.auth import (
    LEEWAY_SECONDS,
    REVOCATIONS_RESTORED_KEY,
    Identity,
    TokenVerifier,
    revoked_family_key,
    revoked_token_key,
)
from shared.errors import ServiceUnavailableError, UnauthorizedError
from shared.kv import KeyValueStore

# Browsers cannot set headers on a WebSocket handshake, so the live channel may carry the
# access token in the query string instead; the gateway removes it before forwarding.
ACCESS_TOKEN_PARAM = "access_token"  # noqa: S105 - a query parameter name

# Tokens whose signature and claims were verified, remembered by their exact text.
VERIFIED_TOKENS: Final = 4096

# One round trip: is the token revoked, is its family, does the store hold the list?
_LOOK_UP = """
return {redis.call('EXISTS', KEYS[1]), redis.call('EXISTS', KEYS[2]),
        redis.call('EXISTS', KEYS[3])}
"""


class Authenticator:
    """Verifies bearer tokens; a signed-in client's next requests skip the signature check.

    A client sends the same access token with every request for its whole life (15
    minutes), and the signature check is the costly part of each request's
    authentication. A verified token's claims cannot change (the text is what was
    signed), so its identity is remembered, by the token's exact text, until the moment
    the verifier itself would call it expired. The revocation list is still read on every
    request: signing out takes effect at once, as before.
    """

    def __init__(
        self,
        verifier: TokenVerifier,
        kv: KeyValueStore,
        *,
        capacity: int = VERIFIED_TOKENS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._verifier = verifier
        self._kv = kv
        self._capacity = capacity
        self._clock = clock
        # token -> (identity, the first instant at which it counts as expired)
        self._verified: dict[str, tuple[Identity, float]] = {}
        self._look_up = kv.script(_LOOK_UP)
        # Whether the store has held the restored list since this process started: a
        # deployment without an api restoring it (tests of the gateway alone) never has.
        self._seen_restored = False

    async def authenticate(self, request: web.Request, *, websocket: bool) -> Identity | None:
        """The verified caller, None when no token was presented, 401 for a bad one.

        A bad token is refused even on public routes: a client that believes it is signed
        in must learn that it is not, rather than silently act as a stranger.
        """
        token = _bearer_token(request)
        if token is None and websocket:
            token = request.query.get(ACCESS_TOKEN_PARAM) or None
        if token is None:
            return None
        identity = self._verify(token)
        token_revoked, family_revoked, restored = await self._look_up(
            keys=[
                revoked_token_key(identity.token_id),
                revoked_family_key(identity.family_id),
                REVOCATIONS_RESTORED_KEY,
            ]
        )
        if token_revoked or family_revoked:
            raise UnauthorizedError("This session has been signed out.", code="token_revoked")
        if restored:
            self._seen_restored = True
        elif self._seen_restored:
            raise ServiceUnavailableError(
                "Sign-outs are being restored after a key-value store restart; "
                "try again in a moment.",
                code="revocations_restoring",
                headers={"Retry-After": "1"},
            )
        return identity

    def _verify(self, token: str) -> Identity:
        remembered = self._verified.get(token)
        if remembered is not None:
            identity, expired_at = remembered
            if self._clock() < expired_at:
                return identity
            del self._verified[token]  # verify() now says why it is refused
        identity = self._verifier.verify(token)
        if len(self._verified) >= self._capacity:
            # The oldest entry goes (dicts keep insertion order): bounded memory whatever
            # number of tokens clients present.
            del self._verified[next(iter(self._verified))]
        # The verifier refuses a token once exp <= now - leeway (PyJWT's rule).
        self._verified[token] = (identity, identity.expires_at + LEEWAY_SECONDS)
        return identity


def _bearer_token(request: web.Request) -> str | None:
    header = request.headers.get(hdrs.AUTHORIZATION)
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise UnauthorizedError(
            "Send the access token as 'Authorization: Bearer <token>'.", code="token_invalid"
        )
    return token.strip()
