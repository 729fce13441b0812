"""Every web.AppKey of the scheduler service."""

from aiohttp import web

from scheduler_service.consumers.base import ConsumerGroup
from scheduler_service.jobs.outbox_relay import OutboxRelay
from scheduler_service.jobs.runner import JobRunner
from scheduler_service.metrics import SchedulerMetrics
from scheduler_service.options import SchedulerOptions
from scheduler_service.services.admin import AdminService

OPTIONS = web.AppKey("scheduler_options", SchedulerOptions)
SCHEDULER_METRICS = web.AppKey("scheduler_metrics", SchedulerMetrics)
RELAY = web.AppKey("outbox_relay", OutboxRelay)
CONSUMER_GROUP = web.AppKey("consumer_group", ConsumerGroup)
JOB_RUNNER = web.AppKey("job_runner", JobRunner)
ADMIN = web.AppKey("admin_service", AdminService)
