"""Every ``web.AppKey`` of the gateway."""

from __future__ import annotations

from aiohttp import web

from gateway.identity import Authenticator
from gateway.proxy.client import UpstreamClient
from gateway.proxy.table import Service
from gateway.proxy.upstreams import ReplicaSet
from gateway.proxy.websocket import OpenWebSockets

UPSTREAM_CLIENT = web.AppKey("upstream_client", UpstreamClient)
REPLICA_SETS = web.AppKey("replica_sets", dict[Service, ReplicaSet])
# Bridged client WebSockets, closed with 1001 when the gateway shuts down.
OPEN_WEBSOCKETS = web.AppKey("open_websockets", OpenWebSockets)
OPENAPI_DOCUMENT = web.AppKey("openapi_document", bytes)
AUTHENTICATOR = web.AppKey("authenticator", Authenticator)
