"""carve.adapters: the adapter registry (SQLite plus a file store) and the intake checks that admit an adapter."""
