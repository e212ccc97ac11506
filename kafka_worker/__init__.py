"""Kafka -> worker -> runner engine -> Kafka: scores text streams with the service's model."""
