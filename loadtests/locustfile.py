"""Load test of vod through the gateway: `locust -f loadtests/locustfile.py --host URL`.

A skeleton: the feature endpoints arrive in later issues, so for now a Viewer only touches
what exists on every build (liveness and the OpenAPI document). The places marked
``LOADTEST(...)`` below are where the design's three kinds of user grow their tasks.

Never imported by pytest: importing locust patches the standard library with gevent. Tests
live under tests/ (pytest's only testpath); this directory is run by locust alone.
"""

from __future__ import annotations

from http import HTTPStatus

from locust import HttpUser, between, task

# Reported under these names, so percentiles group by route rather than by URL.
HEALTHZ = "/healthz"
OPENAPI = "/api/v1/openapi.json"


class Viewer(HttpUser):
    """Someone browsing: lists, opens and watches videos, reads comments and danmaku."""

    # Think time between actions, as a person has; keeps -u N close to N people.
    wait_time = between(1, 3)

    @task(1)
    def healthz(self) -> None:
        with self.client.get(HEALTHZ, name=HEALTHZ, catch_response=True) as response:
            if response.status_code != HTTPStatus.OK:
                response.failure(f"{HEALTHZ} answered {response.status_code}")

    @task(3)
    def openapi(self) -> None:
        with self.client.get(OPENAPI, name=OPENAPI, catch_response=True) as response:
            if response.status_code != HTTPStatus.OK:
                response.failure(f"{OPENAPI} answered {response.status_code}")
            elif "paths" not in response.json():
                response.failure(f"{OPENAPI} is not an OpenAPI document")

    # LOADTEST(Viewer): once the video and streaming issues land, weight these above:
    #   GET /api/v1/videos?limit=20 (then follow next_cursor), GET /api/v1/videos/{id},
    #   GET /api/v1/videos/{id}/stream with a Range header (a few 1 MiB ranges, as a player
    #   seeks), GET /api/v1/videos/{id}/comments, GET /api/v1/videos/{id}/danmaku.


# LOADTEST(Uploader): a signed-in user (POST /api/v1/users, POST /api/v1/sessions in on_start)
# who uploads: POST /api/v1/uploads with the content hash, PUT each 8 MiB chunk with
# X-Chunk-SHA256, POST .../complete, then POST /api/v1/videos. Use a small generated file and
# few users (weight it low): uploads cost the server disk, not only time.
#
# LOADTEST(Commenter): a signed-in viewer who posts: POST /api/v1/videos/{id}/comments and
# POST /api/v1/videos/{id}/danmaku, and holds the live WebSocket open
# (GET /api/v1/videos/{id}/live). Expect and count 429s: rate limits are part of the design.
