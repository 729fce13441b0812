"""Sign-in, token refresh with rotation and theft detection, sign-out.

Refresh tokens are 256-bit random strings; the database keeps only their SHA-256, so a
leaked table cannot be replayed. Each sign-in starts a *family*; every refresh spends the
presented token and adds the next one to the family. Presenting a spent token means two
parties hold it (one of them a thief), so the whole family is revoked, the newest token
too, and the access tokens of the family stop at the gateway at once.

A browser sign-in may bind its family to a device: a random device id, kept by the browser
beside the refresh token (``api_service.session_cookies``) and stored, as its SHA-256, on
every token of the family. A refresh without the matching device id is refused and, as
the token has left the browser it was given to, revokes the family.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from api_service.repositories.refresh_tokens import RefreshTokenRepository
from api_service.repositories.users import User, UserRepository
from api_service.schemas import is_username
from api_service.services.passwords import PasswordHasher
from api_service.services.revocations import Revocations
from shared.auth import REFRESH_TOKEN_SECONDS, Identity, TokenSigner
from shared.db import Database, new_id
from shared.errors import RateLimitedError, UnauthorizedError
from shared.kv import KeyValueStore

# A client address may fail this many times more than one username: many people share
# an address (offices, mobile carriers), and a guesser spreads over many usernames.
PER_ADDRESS_FACTOR = 5


@dataclass(frozen=True, slots=True)
class TokenPair:
    access_token: str
    refresh_token: str
    expires_in: int
    token_type: str = "Bearer"  # noqa: S105 - the OAuth token type, not a secret
    # The device the family is bound to (a browser's cookie mode); None for API clients.
    device_id: str | None = None
    refresh_expires_in: int = REFRESH_TOKEN_SECONDS


def hash_refresh_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# One attempt on an account and from an address, counted in one step before its password
# is verified: parallel guesses cannot all pass a check made before any of them failed.
# KEYS: the account's counter, the address's; ARGV: their limits, the window in ms.
# Returns 0 when the attempt was counted, else (counting nothing) the milliseconds until
# the counter at its limit expires. The window is set only on a new counter, never slid.
_ATTEMPT_LUA = """
for i = 1, 2 do
    if tonumber(redis.call('GET', KEYS[i]) or '0') >= tonumber(ARGV[i]) then
        local left = redis.call('PTTL', KEYS[i])
        if left < 0 then
            redis.call('PEXPIRE', KEYS[i], ARGV[3])
            left = tonumber(ARGV[3])
        end
        return math.max(left, 1)
    end
end
for i = 1, 2 do
    redis.call('INCR', KEYS[i])
    if redis.call('PTTL', KEYS[i]) == -1 then
        redis.call('PEXPIRE', KEYS[i], ARGV[3])
    end
end
return 0
"""

# A sign-in succeeded: the account's count starts again, and the address gets back the
# attempt counted for it (it was not a failure).
_SUCCEEDED_LUA = """
redis.call('DEL', KEYS[1])
if tonumber(redis.call('GET', KEYS[2]) or '0') > 0 then
    redis.call('DECR', KEYS[2])
end
return 0
"""


class LoginThrottle:
    """Counts sign-in attempts per account and per client address in a fixed window.

    Every attempt counts from before its password is verified until it succeeds, so at
    most ``max_failures`` guesses per account (and 5x that per address) are ever verified
    in a window, however many arrive at once; the rest are refused without hashing.
    """

    def __init__(self, kv: KeyValueStore, *, max_failures: int, window_seconds: int) -> None:
        self._max = max_failures
        self._window_ms = window_seconds * 1000
        self._attempt = kv.script(_ATTEMPT_LUA)
        self._succeeded = kv.script(_SUCCEEDED_LUA)

    @staticmethod
    def account(user: User | None, username: str) -> str:
        """The counter of the account found, not of the name typed: every spelling that
        reaches one account shares its count. An unknown name counts by its lower case."""
        return f"user:{user.id}" if user is not None else f"name:{username.lower()}"

    async def attempt(self, account: str, address: str) -> None:
        """Counts one attempt; ``RateLimitedError`` (429, ``Retry-After``) past a limit."""
        left_ms = int(
            await self._attempt(
                keys=[f"login:fail:{account}", f"login:fail:addr:{address}"],
                args=[self._max, self._max * PER_ADDRESS_FACTOR, self._window_ms],
            )
        )
        if left_ms > 0:
            raise RateLimitedError(
                "Too many failed sign-in attempts; try again later.",
                retry_after=math.ceil(left_ms / 1000),
                code="too_many_attempts",
            )

    async def succeeded(self, account: str, address: str) -> None:
        await self._succeeded(keys=[f"login:fail:{account}", f"login:fail:addr:{address}"])


class SessionService:
    def __init__(
        self,
        *,
        db: Database,
        users: UserRepository,
        refresh_tokens: RefreshTokenRepository,
        hasher: PasswordHasher,
        signer: TokenSigner,
        kv: KeyValueStore,
        throttle: LoginThrottle,
        revocations: Revocations,
        refresh_lifetime: int = REFRESH_TOKEN_SECONDS,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._db = db
        self._users = users
        self._refresh_tokens = refresh_tokens
        self._hasher = hasher
        self._signer = signer
        self._kv = kv
        self._throttle = throttle
        self._revocations = revocations
        self._refresh_lifetime = timedelta(seconds=refresh_lifetime)
        self._clock = clock

    async def sign_in(
        self, username: str, password: str, *, address: str, bind_device: bool = False
    ) -> TokenPair:
        invalid = UnauthorizedError("Wrong username or password.", code="invalid_credentials")
        if not is_username(username):
            # No account has such a name. Refused before the lookup, as a database may
            # match it to an account all the same (MariaDB ignores trailing spaces).
            raise invalid
        user = await self._users.by_username(username)
        account = LoginThrottle.account(user, username)
        await self._throttle.attempt(account, address)
        # Verified even for an unknown username (against a decoy), so both take as long.
        matched = await self._hasher.verify(user.password_hash if user else None, password)
        if user is None or not matched:
            raise invalid
        await self._throttle.succeeded(account, address)
        if self._hasher.needs_rehash(user.password_hash):
            await self._users.set_password_hash(user.id, await self._hasher.hash(password))
        return await self._start_family(user, bind_device=bind_device)

    async def _start_family(self, user: User, *, bind_device: bool = False) -> TokenPair:
        family_id = new_id()
        refresh_token = secrets.token_urlsafe(32)
        device_id = secrets.token_urlsafe(32) if bind_device else None
        async with self._db.transaction() as conn:
            await self._refresh_tokens.add(
                conn,
                token_hash=hash_refresh_token(refresh_token),
                family_id=family_id,
                user_id=user.id,
                created_at=self._clock(),
                expires_at=self._clock() + self._refresh_lifetime,
                device_hash=None if device_id is None else hash_refresh_token(device_id),
            )
        return self._pair(user, family_id, refresh_token, device_id)

    def _pair(
        self, user: User, family_id: str, refresh_token: str, device_id: str | None
    ) -> TokenPair:
        access_token, _identity = self._signer.issue(
            user_id=user.id, username=user.username, family_id=family_id
        )
        return TokenPair(
            access_token=access_token,
            refresh_token=refresh_token,
            expires_in=self._signer.lifetime,
            device_id=device_id,
            refresh_expires_in=int(self._refresh_lifetime.total_seconds()),
        )

    async def refresh(self, presented: str, *, device_id: str | None = None) -> TokenPair:
        """The next pair of ``presented``'s family; ``device_id`` is the caller's device
        cookie, required (and matched) when the family is bound to a device."""
        now = self._clock()
        token_hash = hash_refresh_token(presented)
        invalid = UnauthorizedError(
            "The refresh token is not valid; sign in again.", code="refresh_token_invalid"
        )
        record = await self._refresh_tokens.find(token_hash)
        if record is None or record.revoked_at is not None or record.expires_at <= now:
            raise invalid
        if record.device_hash is not None and not _same_device(record.device_hash, device_id):
            await self._revoke_family(record.family_id)
            raise UnauthorizedError(
                "This refresh token was presented without the device it belongs to; every "
                "session of its sign-in is revoked. Sign in again.",
                code="refresh_token_wrong_device",
            )
        user = await self._users.by_id(record.user_id)
        if user is None:
            raise invalid
        next_token = secrets.token_urlsafe(32)
        async with self._db.transaction() as conn:
            # Conditional update: of two concurrent refreshes with one token, one wins.
            spent = await self._refresh_tokens.spend(conn, token_hash, now)
            if spent:
                await self._refresh_tokens.add(
                    conn,
                    token_hash=hash_refresh_token(next_token),
                    family_id=record.family_id,
                    user_id=user.id,
                    created_at=now,
                    expires_at=now + self._refresh_lifetime,
                    device_hash=record.device_hash,
                )
        if not spent:
            await self._revoke_family(record.family_id)
            raise UnauthorizedError(
                "This refresh token was already used; every session of its sign-in is "
                "revoked. Sign in again.",
                code="refresh_token_reused",
            )
        bound_to = device_id if record.device_hash is not None else None
        return self._pair(user, record.family_id, next_token, bound_to)

    async def sign_out(self, identity: Identity) -> None:
        """Revoke the presented access token now and the refresh family behind it."""
        await self._revocations.revoke_token(identity.token_id, expires_at=identity.expires_at)
        await self._revoke_family(identity.family_id)

    async def _revoke_family(self, family_id: str) -> None:
        # Every access token of the family expires within one access lifetime, so the
        # revocation only needs to outlive that.
        await self._revocations.revoke_family(family_id, seconds=self._signer.lifetime + 60)
        async with self._db.transaction() as conn:
            await self._refresh_tokens.revoke_family(conn, family_id, self._clock())


def _same_device(device_hash: str, device_id: str | None) -> bool:
    if device_id is None:
        return False
    return hmac.compare_digest(device_hash, hash_refresh_token(device_id))
