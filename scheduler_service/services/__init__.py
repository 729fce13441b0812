"""The scheduler's business rules: video deletion, media processing, admin views."""
