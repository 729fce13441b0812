"""The scheduler service: background jobs consumed from RabbitMQ."""
