"""Serving: one base model, many LoRA adapters, an OpenAI-compatible HTTP API on Ray Serve.

The pieces, each in its own module:

- ``config``: the validated settings of one server (model, capacity, caps, tokens);
- ``api``: the pydantic request/response models of the HTTP API (OpenAI shapes);
- ``targets``: the one function turning a request's ``model`` into an adapter;
- ``adapter_cache``: an LRU of adapters loaded into the engine, with pinning;
- ``batching``: runs a batch of jobs for many adapters as one engine call;
- ``app``: the Serve deployments (FastAPI gateway + engine replicas);
- ``affinity``: a request router sending a job to a replica holding its adapter;
- ``launcher``: start/stop a local server, or deploy onto an existing cluster.

Nothing here imports torch or ray at module import time except ``app``,
``affinity`` and ``launcher``, which are only imported to serve.
"""
