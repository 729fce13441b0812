"""The scheduler's background work that is not driven by messages: the outbox relay and
the timers (abandoned uploads, unreferenced blobs), each run by one replica at a time
under a Redis lease (``lease``)."""
