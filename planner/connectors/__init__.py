"""How the planner acts on its decisions: `triton` (model-control API, the default),
`advisory` (logs only), `kubernetes` (scales the worker pools' workloads)."""
