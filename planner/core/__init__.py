"""The planner's pure core: an observation window, the current replicas and a profile in,
a `Decision` out. No I/O, no clock, no threads: `planner.loop` feeds it from Triton's
`/metrics` and hands its decisions to a connector; tests and offline replays call it with
table inputs.
"""
