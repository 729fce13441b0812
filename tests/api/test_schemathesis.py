"""Property-based fuzzing of the whole public API from ``gateway/openapi.json``.

schemathesis generates requests for every documented operation (valid and invalid
bodies, parameters and headers) and sends them through the gateway of a full stack (the
four real apps, embedded back ends), signed in as an ordinary user. Every response must:
not be a 5xx; carry a status code the document lists for that operation; have the
documented content type, headers and body schema.

Examples per operation: ``VOD_FUZZ_EXAMPLES`` (default ``DEFAULT_EXAMPLES``, sized so the
whole run stays around a minute on two cores). A deeper run, e.g. before a release::

    VOD_FUZZ_EXAMPLES=300 .venv/bin/pytest tests/api/test_schemathesis.py -q

Path parameters are random for half the examples and, for reads and writes (never
deletions, which would leave nothing to read), the ids of a real video, upload and user
for the other half, so handlers get past their lookups: a random id only ever meets a 404.

Not fuzzed: the live WebSocket (an HTTP upgrade, then frames; schemathesis speaks HTTP).
Its hostile inputs are in ``tests/api/test_hostile_input.py``. See docs/security.md.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import os
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import CheckFunction, not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.clients import Publisher

DEFAULT_EXAMPLES = 120
EXAMPLES = int(os.environ.get("VOD_FUZZ_EXAMPLES", str(DEFAULT_EXAMPLES)))
# Only the operations whose "METHOD /path" contains this text (to chase one finding).
ONLY = os.environ.get("VOD_FUZZ_OPERATIONS", "")

# Operations left out of schema fuzzing, and why (also in docs/security.md).
NOT_FUZZED = {
    "GET /api/v1/videos/{id}/live": "a WebSocket upgrade: schemathesis speaks HTTP only",
}

# Headers that say how the message is framed or where it goes, never generated.
FRAMING = frozenset(
    {"transfer-encoding", "content-length", "host", "connection", "upgrade", "expect", "te"}
)

# tus's PATCH body is raw bytes under tus's own media type.
schemathesis.serializer.alias("application/offset+octet-stream", "application/octet-stream")

CHECKS: list[CheckFunction] = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@dataclass
class Findings:
    by_operation: dict[str, str] = field(default_factory=dict)
    requests: int = 0


def _load_schema() -> Any:
    raw = importlib.resources.files("gateway").joinpath("openapi.json").read_bytes()
    return schemathesis.openapi.from_dict(orjson.loads(raw))


# Signing out revokes the token it is sent with: that operation gets a user of its own,
# so the others keep a valid session.
SIGN_OUT = "DELETE /api/v1/sessions"


def _fuzz(
    base_url: str,
    headers: dict[str, str],
    sign_out_headers: dict[str, str],
    known_ids: dict[str, str],
) -> Findings:
    """Runs in a worker thread: schemathesis is synchronous, the stack needs the loop."""
    schema = _load_schema()
    findings = Findings()
    session = requests.Session()
    for result in schema.get_all_operations():
        operation = result.ok()
        label = f"{operation.method.upper()} {operation.path}"
        if label in NOT_FUZZED or ONLY not in label:
            continue
        sent = sign_out_headers if label == SIGN_OUT else headers
        try:
            _fuzz_operation(
                operation,
                base_url=base_url,
                session=session,
                headers=sent,
                known_ids=known_ids,
                findings=findings,
            )
        except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - reported together below
            findings.by_operation[label] = f"{type(exc).__name__}: {exc}"[:3000]
    return findings


def _fuzz_operation(
    operation: Any,
    *,
    base_url: str,
    session: requests.Session,
    headers: dict[str, str],
    known_ids: dict[str, str],
    findings: Findings,
) -> None:
    """``EXAMPLES`` requests: valid ones (which reach the handlers) and invalid ones."""
    strategies = [
        operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
        operation.as_strategy(generation_mode=GenerationMode.NEGATIVE),
    ]
    names = re.findall(r"{(\w+)}", operation.path)
    if names and operation.method.lower() != "delete" and all(n in known_ids for n in names):
        fixed = {name: known_ids[name] for name in names}
        strategies += [
            operation.as_strategy(generation_mode=mode, path_parameters=fixed)
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
        ]
    cases = st.one_of(strategies)

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=cases)
    def run(case: Any) -> None:
        findings.requests += 1
        if case.headers:
            # Negative cases may carry any header, framing ones included: those belong
            # to HTTP/1.1, not to the API, and a message with framing aiohttp's parser
            # rejects is refused before any of vod's code runs (docs/security.md).
            case.headers = {k: v for k, v in case.headers.items() if k.lower() not in FRAMING}
        case.call_and_validate(
            base_url=base_url, session=session, headers=headers, checks=CHECKS, timeout=10
        )

    run()


@pytest.mark.timeout(600)
async def test_every_operation_survives_fuzzing(stack: Any) -> None:
    username = f"fuzz_{secrets.token_hex(3)}"
    headers, sign_out_headers = await stack.new_user(username), await stack.new_user()
    publisher = Publisher(stack, username, headers)
    video = await publisher.video()
    in_progress = await publisher.uploader.start(os.urandom(1000))
    tus = await stack.gateway.post(
        "/api/v1/tus/", headers={**headers, "Tus-Resumable": "1.0.0", "Upload-Length": "1000"}
    )
    assert tus.status == 201, await tus.text()
    known_ids = {
        "id": video["id"],
        "video_id": video["id"],
        "username": username,
        "upload_id": in_progress["upload_id"],
        "tus_id": tus.headers["Location"].rstrip("/").rsplit("/", 1)[-1],
    }
    base_url = str(stack.gateway.make_url("")).rstrip("/")
    findings = await asyncio.to_thread(_fuzz, base_url, headers, sign_out_headers, known_ids)
    assert findings.requests > 0
    assert not findings.by_operation, "\n\n".join(
        f"{label}\n{text}" for label, text in findings.by_operation.items()
    )
