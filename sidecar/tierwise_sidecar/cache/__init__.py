"""The prompt-result cache: L1 in memory, L2 Redis, L3 SQLite or PostgreSQL, as a pipeline stage."""
