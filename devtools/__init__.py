"""Development tools that never ship: a local Kafka-protocol broker for demos and tests."""
