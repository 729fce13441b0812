"""The live danmaku channel: the per-replica hub behind ``GET /api/v1/videos/{id}/live``."""
