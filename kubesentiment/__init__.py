"""Everything the entry service (service.py) and the Kafka worker (kafka_worker/) run on besides
the model: the HTTP edge (api/), the batch-job store (jobs/), settings, observability and Vault.
One distinctive name, so that an installed wheel adds no generic module names to site-packages."""
