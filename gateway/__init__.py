"""OpenAI-compatible HTTP gateway: validation, admission, routing to replicas, streaming, metrics.

Never imports torch. Entry points: `gateway.app.create_app`, `gateway.replica_client.ReplicaPool`,
`gateway.config.GatewayConfig`.
"""
