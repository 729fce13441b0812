"""The scheduler service: background work that never gets lost.

- ``jobs.outbox_relay``  publishes the events other services commit to the outbox;
- ``consumers``          one durable queue per kind of event, idempotent on the message id
                         (``consumers.base``: the framework every consumer registers with);
- ``jobs.runner``        periodic jobs (``jobs.upload_sweeper``, ``jobs.blob_collector``);
- ``jobs.lease``         the Redis leases that keep the relay and each job on one replica.

``app.create_app`` wires them after the back ends; ``options.SchedulerOptions`` holds
their intervals.
"""
