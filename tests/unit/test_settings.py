"""Settings: one frozen object; a bad or missing variable stops start-up naming itself."""

from __future__ import annotations

import dataclasses

import pytest

from shared.errors import ConfigError
from shared.settings import STANDALONE_DEFAULTS, Settings

SERVICES_ENV = {
    "VOD_DB_URL": "mysql+aiomysql://vod:pw@db/vod",
    "VOD_REDIS_URL": "redis://cache:6379/0",
    "VOD_AMQP_URL": "amqp://guest:guest@broker/",
    "VOD_BLOB_URL": "file:///srv/blobs",
    "VOD_API_URL": "http://api-a:8001,http://api-b:8001",
    "VOD_STREAM_URL": "http://stream:8002",
    "VOD_SCHEDULER_URL": "http://scheduler:8003",
    "VOD_INTERNAL_TOKEN": "a-long-random-internal-secret",
}


def test_services_mode_reads_every_variable() -> None:
    settings = Settings.from_env(SERVICES_ENV | {"VOD_MAX_UPLOAD_BYTES": "1048576"})
    assert settings.db_url == "mysql+aiomysql://vod:pw@db/vod"
    assert settings.max_upload_bytes == 1048576
    assert settings.upstream_urls("api") == ("http://api-a:8001", "http://api-b:8001")
    assert settings.namespace == "vod"
    assert settings.stream_stall_seconds == 30.0
    assert settings.public_url is None
    public = {"VOD_PUBLIC_URL": "https://vod.example.com:8443/vod/"}
    assert Settings.from_env(SERVICES_ENV | public).public_url == "https://vod.example.com:8443/vod"
    assert (
        Settings.from_env(SERVICES_ENV | {"VOD_STREAM_STALL_SECONDS": "1.5"}).stream_stall_seconds
        == 1.5
    )


def test_settings_are_frozen() -> None:
    settings = Settings.from_env(SERVICES_ENV)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.db_url = "sqlite+aiosqlite:///x"  # type: ignore[misc]


def test_secrets_and_dsns_stay_out_of_repr() -> None:
    text = repr(Settings.from_env(SERVICES_ENV))
    assert "a-long-random-internal-secret" not in text
    assert "pw@db" not in text


@pytest.mark.parametrize("missing", ["VOD_DB_URL", "VOD_REDIS_URL", "VOD_INTERNAL_TOKEN"])
def test_missing_variable_is_named(missing: str) -> None:
    env = {k: v for k, v in SERVICES_ENV.items() if k != missing}
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    assert caught.value.variable == missing
    assert str(caught.value).startswith(f"{missing}: ")


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("VOD_DB_URL", "postgres://x/y"),
        ("VOD_REDIS_URL", "localhost:6379"),
        ("VOD_API_URL", "api:8001"),
        ("VOD_GATEWAY_PORT", "70000"),
        ("VOD_GATEWAY_PORT", "eighty"),
        ("VOD_MAX_UPLOAD_BYTES", "-5"),
        ("VOD_DB_MIGRATE", "maybe"),
        ("VOD_SECURE_COOKIES", "maybe"),
        ("VOD_NAMESPACE", "Bad Name"),
        ("VOD_INTERNAL_TOKEN", "changeme"),
        ("VOD_LOG_LEVEL", "LOUD"),
        ("VOD_LOG_FORMAT", "pretty"),
        ("VOD_SIGNUP_RATE", "20"),
        ("VOD_SIGNUP_RATE", "0/3600"),
        ("VOD_PASSWORD_HASH_CONCURRENCY", "0"),
        ("VOD_STREAM_STALL_SECONDS", "0"),
        ("VOD_STREAM_STALL_SECONDS", "nan"),
        ("VOD_PUBLIC_URL", "vod.example.com"),
        ("VOD_PUBLIC_URL", "ftp://vod.example.com"),
        ("VOD_PUBLIC_URL", "https://vod.example.com/?next=x"),
        ("VOD_PUBLIC_URL", "https://user:pw@vod.example.com"),
    ],
)
def test_malformed_variable_is_named(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(SERVICES_ENV | {variable: value})
    assert caught.value.variable == variable


def test_sign_up_and_hashing_bounds_default_to_the_design() -> None:
    settings = Settings.from_env(SERVICES_ENV)
    assert settings.signup_rate == (20, 3600.0)
    assert settings.password_hash_concurrency == 4
    tuned = Settings.from_env(
        SERVICES_ENV | {"VOD_SIGNUP_RATE": "5/60", "VOD_PASSWORD_HASH_CONCURRENCY": "2"}
    )
    assert tuned.signup_rate == (5, 60.0)
    assert tuned.password_hash_concurrency == 2


def test_standalone_defaults_need_no_environment() -> None:
    settings = Settings.from_env({}, defaults=STANDALONE_DEFAULTS)
    assert settings.db_url.startswith("sqlite+aiosqlite://")
    assert settings.redis_url.startswith("memory://")
    assert settings.amqp_url.startswith("memory://")
    # A fresh internal token per standalone start, never a fixed one.
    other = Settings.from_env({}, defaults=STANDALONE_DEFAULTS)
    assert settings.internal_token != other.internal_token


def test_environment_overrides_standalone_defaults() -> None:
    settings = Settings.from_env(
        {"VOD_REDIS_URL": "redis://127.0.0.1:6379/1", "HOME": "/root"},
        defaults=STANDALONE_DEFAULTS,
    )
    assert settings.redis_url == "redis://127.0.0.1:6379/1"
