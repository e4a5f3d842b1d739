"""Replay traces: the trace format (trace), a seeded synthetic reference trace (tracegen), and a
converter from gateway request logs (convert)."""
