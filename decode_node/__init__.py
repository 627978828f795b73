"""The decode replica: receives prompt KV from prefill replicas and decodes with hybrid batching."""
