"""carve.adapters: the adapter registry (SQLite plus a file store) and adapter validation."""
