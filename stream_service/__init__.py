"""The stream service: chunked resumable upload and byte-range streaming."""
