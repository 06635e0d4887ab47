"""Our vLLM KV connector against vLLM's NIXL connector: `python -m benchmarks.kv_connectors`."""
