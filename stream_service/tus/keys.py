"""The web.AppKey of the tus endpoint's service."""

from aiohttp import web

from stream_service.tus.service import TusService

TUS = web.AppKey("tus_uploads", TusService)
