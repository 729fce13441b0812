"""stream_service."""
