"""The api service's URL table; route names match handler names."""

from aiohttp import web

from api_service.handlers import accounts, comments, danmaku, videos


def setup_routes(app: web.Application) -> None:
    router = app.router
    router.add_post("/api/v1/users", accounts.create_user, name="create_user")
    # /users/me before /users/{username}: "me" is reserved and never a username.
    router.add_get("/api/v1/users/me", accounts.get_me, name="get_me")
    router.add_get("/api/v1/users/{username}", accounts.get_user, name="get_user")
    router.add_get(
        "/api/v1/users/{username}/videos", videos.list_user_videos, name="list_user_videos"
    )
    router.add_post("/api/v1/sessions", accounts.create_session, name="create_session")
    router.add_post("/api/v1/sessions/refresh", accounts.refresh_session, name="refresh_session")
    router.add_delete("/api/v1/sessions", accounts.delete_session, name="delete_session")
    router.add_post("/api/v1/videos", videos.create_video, name="create_video")
    router.add_get("/api/v1/videos", videos.list_videos, name="list_videos")
    router.add_get("/api/v1/videos/{video_id}", videos.get_video, name="get_video")
    router.add_patch("/api/v1/videos/{video_id}", videos.update_video, name="update_video")
    router.add_delete("/api/v1/videos/{video_id}", videos.delete_video, name="delete_video")
    router.add_get(
        "/api/v1/videos/{video_id}/comments", comments.list_comments, name="list_comments"
    )
    router.add_post(
        "/api/v1/videos/{video_id}/comments", comments.create_comment, name="create_comment"
    )
    router.add_delete(
        "/api/v1/videos/{video_id}/comments/{comment_id}",
        comments.delete_comment,
        name="delete_comment",
    )
    router.add_get("/api/v1/videos/{video_id}/danmaku", danmaku.list_danmaku, name="list_danmaku")
    router.add_post(
        "/api/v1/videos/{video_id}/danmaku", danmaku.create_danmaku, name="create_danmaku"
    )
    router.add_get("/api/v1/videos/{video_id}/live", danmaku.watch_live, name="watch_live")
