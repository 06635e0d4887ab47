"""The planner's profiler: `python -m planner.profile` measures one worker on the machine it
runs on (prefill TTFT per input length, decode ITL per concurrency and context) and writes
the `planner.core.profile.Profile` that the planner's SLA mode reads. `main` holds the flags
and the server's lifetime, `measure` the measurement."""
