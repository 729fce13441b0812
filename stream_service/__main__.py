"""`python -m stream_service`: the
stream service as its own process, configured by VOD_* variables."""

from shared.runner import run_service
from stream_service.app import SERVICE, create_app

if __name__ == "__main__":
    # asyncio's loop: the only one with sendfile, which every range is sent with.
    run_service(SERVICE, create_app, lambda settings: settings.stream_port, event_loop="asyncio")
