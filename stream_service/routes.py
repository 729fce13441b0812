"""The stream service's URL table; route names match handler names."""

from aiohttp import web

from stream_service.handlers import uploads
from stream_service.streaming import handlers as streaming
from stream_service.tus import handlers as tus


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
    # tus 1.0.0: the creation URL with and without its slash (clients are given either).
    for creation in ("/api/v1/tus", "/api/v1/tus/"):
        suffix = "_slash" if creation.endswith("/") else ""
        router.add_route("OPTIONS", creation, tus.discover_tus, name=f"discover_tus{suffix}")
        router.add_post(creation, tus.create_tus_upload, name=f"create_tus_upload{suffix}")
    tus_upload = "/api/v1/tus/{upload_id}"
    router.add_route("OPTIONS", tus_upload, tus.discover_tus, name="discover_tus_upload")
    router.add_route("HEAD", tus_upload, tus.get_tus_offset, name="get_tus_offset")
    router.add_patch(tus_upload, tus.patch_tus_upload, name="patch_tus_upload")
    router.add_delete(tus_upload, tus.delete_tus_upload, name="delete_tus_upload")
    # add_get also answers HEAD with the same handler (headers only).
    router.add_get("/api/v1/videos/{video_id}/stream", streaming.stream_video, name="stream_video")
    router.add_get(
        "/api/v1/videos/{video_id}/thumbnail", streaming.get_thumbnail, name="get_thumbnail"
    )
