"""Serving a stored video: RFC 9110 ranges, conditional requests, sendfile."""
