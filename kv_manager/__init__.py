"""KV-cache management: block hashing, the paged block pool with prefix caching, KV events,
and KV transfer between worker processes (`kv_manager.transfer`).

Only `kv_manager.transfer` imports torch; the rest is pure Python so that the router can use
hashing and events without it.
"""
