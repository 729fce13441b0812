"""The scheduler's URL table (admin only; the gateway routes ``/api/v1/admin`` here)."""

from aiohttp import web

from scheduler_service.handlers import admin


def setup_routes(app: web.Application) -> None:
    router = app.router
    router.add_get("/api/v1/admin/queues", admin.list_queues, name="list_queues")
    router.add_get("/api/v1/admin/jobs", admin.list_jobs, name="list_jobs")
    router.add_get("/api/v1/admin/queues/{queue}/parked", admin.list_parked, name="list_parked")
    router.add_post(
        "/api/v1/admin/queues/{queue}/parked/requeue",
        admin.requeue_parked,
        name="requeue_parked",
    )
    router.add_get("/api/v1/admin/deletions/{video_id}", admin.get_deletion, name="get_deletion")
