"""The Carve Serve application: a gateway deployment in front of N engine replicas.

``build_app`` is also the import path of deploy/serve.yaml
(``carve.platform.app:build_app``); Serve passes the YAML's ``args``.
"""

from __future__ import annotations

from typing import Any, Union

from carve.platform.config import ServeConfig

APP_NAME = "carve"
HEAD_NODE_RESOURCE = "node:__internal_head__"  # Ray gives it to the head node only


def build_app(args: Union[ServeConfig, dict[str, Any], None] = None) -> Any:
    """A bound Serve application for ``args`` (a ServeConfig or its fields as a dict)."""
    from ray.serve.config import RequestRouterConfig

    from carve.platform.affinity import AdapterAffinityRouter
    from carve.platform.engine_server import EngineServer
    from carve.platform.gateway import Gateway

    config = args if isinstance(args, ServeConfig) else ServeConfig.from_env(**(args or {}))
    shipped = config.model_dump(mode="json")
    engine_options: dict[str, Any] = dict(
        num_replicas=config.replicas,
        ray_actor_options={"num_cpus": config.engine_num_cpus, "num_gpus": config.engine_num_gpus},
        # Above what the scheduler holds (running + waiting), so that the replica, not Serve's queue, refuses overload.
        max_ongoing_requests=max(4 * config.max_batch_size, config.max_batch_size + config.max_waiting + 8, 64),
    )
    if config.replicas > 1:
        engine_options["request_router_config"] = RequestRouterConfig(
            request_router_class=AdapterAffinityRouter, request_routing_stats_period_s=2.0, request_routing_stats_timeout_s=5.0
        )
    engine = EngineServer.options(**engine_options).bind(shipped)
    gateway_actor: dict[str, Any] = {"num_cpus": config.gateway_num_cpus}
    if config.proxy_location == "HeadOnly":  # beside the one proxy: a lost worker node never takes the ingress with it
        gateway_actor["resources"] = {HEAD_NODE_RESOURCE: 0.001}
    return Gateway.options(ray_actor_options=gateway_actor).bind(engine, shipped)
