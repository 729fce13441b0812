"""`python -m scheduler_service`: the
scheduler service as its own process, configured by VOD_* variables."""

from scheduler_service.app import SERVICE, create_app
from shared.runner import run_service

if __name__ == "__main__":
    run_service(SERVICE, create_app, lambda settings: settings.scheduler_port)
