"""`python -m api_service`: the api service as its own process, configured by VOD_* variables."""

from api_service.app import SERVICE, create_app
from shared.runner import run_service

if __name__ == "__main__":
    run_service(SERVICE, create_app, lambda settings: settings.api_port)
