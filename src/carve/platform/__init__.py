"""carve.platform: base models, the branch-mixing decoding engine, and serving.

The folder is a subpackage (not a top-level ``platform`` package) because a
top-level ``platform`` would shadow the standard library module torch imports.
"""
