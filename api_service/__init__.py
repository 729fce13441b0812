"""api_service."""
