"""carve.common: small helpers every layer may use (hashing, JSONL files, paths, progress, error text).

Nothing here imports another ``carve`` package.
"""
