"""The prefill-heavy replica: computes prompts and pushes their KV to decode replicas."""
