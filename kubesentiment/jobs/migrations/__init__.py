"""The versioned schema of the job store (Alembic). `store.JobStore` upgrades a database to the
newest revision when it opens it, under a lock, so replicas starting together do not race.

A new revision: copy the newest file in versions/, give it a new `revision` and set
`down_revision` to the one before; upgrades must keep old rows readable."""
