"""Serving: one base model, many LoRA adapters, an OpenAI-compatible HTTP API on Ray Serve.

The pieces, each in its own module:

- ``config``: the validated settings of one server (model, capacity, caps, tokens);
- ``api``: the pydantic request/response bodies of the HTTP API (OpenAI shapes);
- ``targets``: AdapterRef (an adapter version as engine replicas see it) and the
  served-model listing; the gateway routes each request through carve.router
  (names, tags, ``auto``, mixtures in output or weight space);
- ``requests``: body parsing, chat template, token counts and limits -> an engine job;
- ``adapter_cache``: an LRU of adapters loaded into the engine, with pinning;
- ``batching``: runs a batch of jobs for many adapters (and mixtures) as one engine call;
- ``engine_server``: the engine replica (``@serve.batch`` over every adapter);
- ``gateway``: the FastAPI ingress (inference, routing, ``/v1/specializations``
  jobs, operator API, health, metrics);
- ``affinity``: a request router sending a job to a replica holding its adapter;
- ``archive``: safe extraction of uploaded adapter archives;
- ``metrics``: the Prometheus counters and histograms;
- ``app``: the Serve application builder (also deploy/serve.yaml's import path);
- ``launcher``: start/stop a local server, or deploy onto an existing cluster.

Only ``engine_server``, ``gateway``, ``affinity``, ``app`` and ``launcher``
import Ray, and torch is imported only where a model is loaded.
"""
