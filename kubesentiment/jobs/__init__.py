"""Async batch jobs: the store (SQLite or PostgreSQL, shared by replicas), its versioned schema
(migrations/) and the loop that scores claimed chunks in the scheduler's bulk lane."""
