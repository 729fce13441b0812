"""Where an interrupted upload is remembered: one small JSON file per (gateway, content
hash), holding the upload id. The server knows which chunks it has; this only says which
upload to ask about, so a killed upload picks up where it stopped."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def default_folder(env: Mapping[str, str]) -> Path:
    """``$VOD_CACHE_DIR``, else ``$XDG_CACHE_HOME/vod``, else ``~/.cache/vod``."""
    if env.get("VOD_CACHE_DIR"):
        return Path(env["VOD_CACHE_DIR"])
    base = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "vod"


class ResumeStore:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def path_for(self, gateway: str, content_hash: str) -> Path:
        key = hashlib.sha256(f"{gateway.rstrip('/')}\n{content_hash}".encode()).hexdigest()
        return self.folder / f"upload-{key[:32]}.json"

    def load(self, gateway: str, content_hash: str) -> dict[str, Any] | None:
        try:
            record = json.loads(self.path_for(gateway, content_hash).read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def save(self, gateway: str, content_hash: str, record: Mapping[str, Any]) -> None:
        """Written whole or not at all (a kill mid-write leaves the previous file)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path_for(gateway, content_hash)
        partial = path.with_suffix(".tmp")
        partial.write_text(json.dumps(dict(record)))
        os.replace(partial, path)

    def forget(self, gateway: str, content_hash: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path_for(gateway, content_hash).unlink()
