"""Every web.AppKey of the api service."""

from aiohttp import web

from api_service.live.hub import LiveHub
from api_service.live.token_watch import TokenWatch
from api_service.read_routing import ReadYourWrites
from api_service.services.comments import CommentService
from api_service.services.danmaku import DanmakuService
from api_service.services.revocations import Revocations
from api_service.services.sessions import SessionService
from api_service.services.users import UserService
from api_service.services.videos import VideoService
from shared.auth import TokenSigner

USERS = web.AppKey("users", UserService)
SESSIONS = web.AppKey("sessions", SessionService)
SIGNER = web.AppKey("signer", TokenSigner)
VIDEOS = web.AppKey("videos", VideoService)
COMMENTS = web.AppKey("comments", CommentService)
DANMAKU = web.AppKey("danmaku", DanmakuService)
LIVE_HUB = web.AppKey("live_hub", LiveHub)
TOKEN_WATCH = web.AppKey("token_watch", TokenWatch)
REVOCATIONS = web.AppKey("revocations", Revocations)
READ_PINS = web.AppKey("read_pins", ReadYourWrites)
