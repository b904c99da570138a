"""HALO slim device runtime: executes a compiled plan.

`core` (socket-free: plan, model math, coordinator), `net` (wire, transport, worker),
`storage` (streaming shards) and `cli` (`halo-run`)."""
__version__ = "0.1.0"
