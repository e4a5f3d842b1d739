"""Budgets: rules, ledgers (memory, SQLite, Redis) and the budget stage."""
