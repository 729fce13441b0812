"""The gateway's own handlers: the proxy entry point and the documents it serves."""
