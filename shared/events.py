"""Event names and payloads the services agree on (the routing keys of ``vod.events``).

Payloads are plain JSON objects; each constant documents its fields. A consumer must
tolerate fields it does not know (producers may add some), never missing ones.
"""

from __future__ import annotations

from typing import Final

# {"upload_id", "owner_id", "content_hash", "size", "filename"}: a file is stored whole
# and verified under its content hash. Through the outbox: it must not be lost.
UPLOAD_COMPLETED: Final = "upload.completed"

# {"video_id", "owner_id", "content_hash"}: a video was soft-deleted; the scheduler
# removes its rows and, when nothing else references it, its blob. Through the outbox.
VIDEO_DELETED: Final = "video.deleted"

# {"id", "video_id", "author_id", "offset_ms", "content", "mode", "color", "created_at"}:
# a danmaku readable in Redis already; the scheduler persists it in batches.
DANMAKU_CREATED: Final = "danmaku.created"
