"""The stream service's URL table; route names match handler names."""

from aiohttp import web

from stream_service.handlers import uploads
from stream_service.streaming import handlers as streaming


def setup_routes(app: web.Application) -> None:
    router = app.router
    router.add_post("/api/v1/uploads", uploads.create_upload, name="create_upload")
    router.add_get("/api/v1/uploads/{upload_id}", uploads.get_upload, name="get_upload")
    router.add_delete("/api/v1/uploads/{upload_id}", uploads.delete_upload, name="delete_upload")
    router.add_put(
        "/api/v1/uploads/{upload_id}/chunks/{index}", uploads.put_chunk, name="put_chunk"
    )
    router.add_post(
        "/api/v1/uploads/{upload_id}/complete", uploads.complete_upload, name="complete_upload"
    )
    # add_get also answers HEAD with the same handler (headers only).
    router.add_get("/api/v1/videos/{video_id}/stream", streaming.stream_video, name="stream_video")
    router.add_get(
        "/api/v1/videos/{video_id}/thumbnail", streaming.get_thumbnail, name="get_thumbnail"
    )
