"""``python -m gateway``: the gateway as its own process, configured by ``VOD_*`` variables."""

from gateway.app import create_app
from shared.runner import run_service

if __name__ == "__main__":
    # The gateway faces clients directly: one that hangs up cancels its handler, and with
    # it the upstream request it was waiting on.
    run_service("gateway", create_app, lambda s: s.gateway_port, handler_cancellation=True)
