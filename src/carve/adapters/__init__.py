"""carve.adapters: the adapter registry (database records plus a file store) and the intake checks that admit an adapter."""
