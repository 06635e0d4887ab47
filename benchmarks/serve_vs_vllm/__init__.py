"""`vllm serve` against `trident serve` under vLLM's own client; see `main` for the benchmark."""
