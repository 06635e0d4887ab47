"""The planner: an external process that resizes the worker pools to meet latency targets.

`python -m planner` (`main`) reads Triton's `/metrics` (`metrics`), asks the pure core
(`core.policy.plan`) for a decision once per window (`loop`), and acts through a connector
(`connectors`: Triton model control with draining, advisory, Kubernetes).
`python -m planner.profile` measures the worker profile that the SLA mode reads.
"""
