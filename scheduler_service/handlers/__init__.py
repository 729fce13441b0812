"""HTTP handlers of the scheduler's admin API: parse, one service call, serialise."""
