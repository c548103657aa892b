"""carve.platform: the Ray Serve application, the one place that wires everything together.

The gateway (OpenAI-compatible inference, the operator API over the registry,
the specialization-jobs API), the engine replicas, the request rules between
them, metrics, and how the app is built and launched. Only the CLI imports it.

The folder is a subpackage (not a top-level ``platform`` package) because a
top-level ``platform`` would shadow the standard library module torch imports.
"""
