"""The HTTP gateway: OpenAI-compatible inference, the operator API, health and metrics.

The gateway holds the tokenizer (chat template, token counts, context checks)
and the adapter registry; it turns each request into an engine job and hands
it to the engine deployment. It never holds model weights.
"""

# No `from __future__ import annotations` here: FastAPI reads these handlers' annotations
# at runtime through Serve's class-based ingress, where string annotations do not resolve.
import asyncio
import contextlib
import hmac
import json
import logging
import shutil
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Optional, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve

from carve.artifact import BASE_MODEL
from carve.engine.batching import Job, JobEvent, JobResult
from carve.engine.text import context_length, encode_plain, encode_prompt, longest_token_chars
from carve.platform import api as oa
from carve.platform import responses, streaming
from carve.platform.archive import ArchiveError, extract_adapter_archive
from carve.platform.config import ServeConfig
from carve.platform.engine_client import Admission, RetryPolicy, call_with_retries, open_stream
from carve.platform.metrics import ServerMetrics
from carve.platform.requests import ApiError, PlannedPrompt, check_token_ids, parse_body, parse_json_object, plan_request, render_chat, validate
from carve.platform.targets import UnknownModel, served_model_names, served_models

GATEWAY_DEPLOYMENT = "CarveGateway"
ARCHIVE_TYPES = ("application/gzip", "application/x-gzip", "application/x-tar", "application/zip", "application/octet-stream")
T = TypeVar("T")

api = FastAPI(title="Carve", description="One base model, many domain adapters; OpenAI-compatible.", docs_url="/docs")


@api.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def _bearer(request: Request) -> Optional[str]:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _token_matches(given: Optional[str], expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, message, kind="authentication_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def _adapter_info(record: Any) -> oa.AdapterInfo:
    return oa.AdapterInfo(
        name=record.name,
        version=record.version,
        tags=list(record.tags),
        base_model_id=record.base_model_id,
        rank=record.rank,
        alpha=record.alpha,
        target_modules=list(record.target_modules),
        path=str(record.path),
        created_at=str(record.created_at) if record.created_at is not None else None,
        card=record.card,
    )


def _adapter_keys(job: Job) -> list[str]:
    """The adapters a job decodes with, for the per-adapter request counter (the base model counts as "base")."""
    return [ref.key for ref in job.refs()] or [BASE_MODEL]


def _engine_error(event: JobEvent | JobResult) -> ApiError:
    if event.error_kind == "overloaded":  # refused before it started: the client may retry (OpenAI's clients honour Retry-After)
        retry = str(max(1, round(event.retry_after_s or 1)))
        return ApiError(429, event.error or "the server is at capacity", kind="server_overloaded", code="engine_overloaded", headers={"Retry-After": retry})
    if event.error_kind == "adapter_load":
        return ApiError(500, event.error or "adapter failed to load", kind="server_error", code="adapter_load_failed")
    return ApiError(500, event.error or "internal error", kind="server_error", code="engine_error")


def _check_database(config: ServeConfig) -> None:
    """Refuse to start on a database this cluster cannot share (the same check as `carve serve`, for `serve deploy`)."""
    import ray

    from carve.common.database import DatabaseError, check_for_cluster

    advice = check_for_cluster(config.database(), sum(1 for node in ray.nodes() if node.get("Alive")))
    if advice is not None and advice.refuse:
        raise DatabaseError(advice.reason)
    if advice is not None:
        logging.getLogger(__name__).warning("%s", advice.reason)


def _sse(payload: Any) -> str:
    data = payload.model_dump_json(exclude_none=False) if hasattr(payload, "model_dump_json") else json.dumps(payload)
    return f"data: {data}\n\n"


@serve.deployment(name=GATEWAY_DEPLOYMENT, max_ongoing_requests=1024)
@serve.ingress(api)
class Gateway:
    """FastAPI ingress in front of the engine deployment."""

    def __init__(self, engine: Any, config: dict[str, Any]):
        from transformers import AutoTokenizer

        from carve.engine.models import resolve_model

        self.config = ServeConfig.model_validate(config)
        self.engine = engine
        self.base = resolve_model(self.config.model)
        self.tokenizer = AutoTokenizer.from_pretrained(self.base.path)
        self.context = context_length(self.base.path)
        self.token_chars = longest_token_chars(self.tokenizer)  # refuses a prompt far over the context before tokenizing it
        self.metrics = ServerMetrics()
        self.retry = RetryPolicy(on_retry=self.metrics.replica_retry)
        self.admission = Admission(self.config.replicas * (self.config.max_batch_size + self.config.max_waiting))
        _check_database(self.config)
        from carve.adapters.registry import Registry

        self.registry = Registry(self.config.registry_path(), self.config.database())  # a connection per call: thread-safe
        from carve.jobs.http import JobsHttp
        from carve.jobs.service import JobService, RayLauncher
        from carve.router import Router, RouterConfig
        from carve.router.metrics import RoutingMetrics

        self.router = Router(self.registry, RouterConfig(), base_fingerprint=self.base.fingerprint)
        self.routing_metrics = RoutingMetrics(self.metrics.registry)
        self.jobs = JobsHttp(
            JobService(self.config.registry_path(), self.config.model, RayLauncher(), self.config.jobs, database=self.config.database())
        )
        self._warm_lock = threading.Lock()  # one warm-up at a time (start, then after each registration)
        # Auto routing embeds every adapter's profile once (10-25 s with the embedding model): start now, not on the first request.
        threading.Thread(target=self._warm_router, name="carve-router-warm", daemon=True).start()

    def _warm_router(self) -> None:
        try:
            with self._warm_lock:
                self.router.warm()
        except Exception as exc:  # a profile that fails now fails again, with its error, on the auto request that needs it
            logging.getLogger(__name__).warning("router warm-up failed: %s: %s", type(exc).__name__, exc)

    # -- helpers ------------------------------------------------------------

    async def _with_registry(self, fn: Callable[[Any], T]) -> T:
        """Run a (blocking, database) registry call off the event loop."""
        return await asyncio.to_thread(fn, self.registry)

    def _check_inference_auth(self, request: Request) -> None:
        if self.config.api_key is None:
            return
        token = _bearer(request)
        if not (_token_matches(token, self.config.api_key) or (self.config.admin_token and _token_matches(token, self.config.admin_token))):
            raise _unauthorized("missing or wrong API key: send 'Authorization: Bearer <key>'" if token is None else "wrong API key")

    def _check_admin(self, request: Request) -> None:
        if not self.config.admin_token:
            raise _unauthorized("the operator API is disabled: start the server with CARVE_ADMIN_TOKEN set")
        token = _bearer(request)
        if token is None:
            raise _unauthorized("missing operator token: send 'Authorization: Bearer <CARVE_ADMIN_TOKEN>'")
        if not _token_matches(token, self.config.admin_token):
            raise _unauthorized("wrong operator token")

    async def _counted(self, endpoint: str, handler: Callable[[], Any]) -> Response:
        try:
            response = await handler()
        except ApiError as exc:
            response = JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)
        self.metrics.request(endpoint, response.status_code)
        return response

    async def _route(self, body: oa._Request) -> Any:
        """The router's decision for a request (off the event loop); RoutingError -> the HTTP error it names."""
        from carve.router import RoutingError, routing_text

        if isinstance(body, oa.CompletionRequest):  # the first prompt, decoded when it is token ids
            first = body.prompt_list()[0]
            text = routing_text(first if isinstance(first, str) else self.tokenizer.decode(list(first)))
        else:
            text = routing_text(body.template_messages())
        try:
            decision = await asyncio.to_thread(self.router.route, body.model, text, body.carve)
        except RoutingError as exc:
            if exc.code == "model_not_found" and exc.param == "model":  # list what is served, as /v1/models does
                served = await self._with_registry(served_model_names)
                raise ApiError(404, str(UnknownModel(body.model, served)), param="model", code="model_not_found") from None
            raise ApiError(exc.status, str(exc), param=exc.param, code=exc.code) from None
        if len(decision.uses()) > self.config.max_adapters:
            raise ApiError(
                400, f"the mixture uses {len(decision.uses())} adapters; this server holds at most {self.config.max_adapters} per replica",
                param="carve", code="mixture_too_large",
            )
        self.routing_metrics.count(decision)
        return decision

    # -- inference ----------------------------------------------------------

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.base.name, "model_id": self.base.model_id}

    @api.get("/metrics")
    async def prometheus(self) -> Response:
        body, content_type = self.metrics.render()
        return Response(body, media_type=content_type)

    @api.get("/v1/models")
    async def models(self, request: Request) -> Response:
        async def handler() -> Response:
            self._check_inference_auth(request)
            records, tags = await self._with_registry(served_models)
            created = oa.now()
            cards = [oa.ModelCard(id=BASE_MODEL, created=created, carve={"kind": "base", "model": self.base.name, "model_id": self.base.model_id})]
            for record in records:
                cards.append(oa.ModelCard(id=record.name, created=created, carve={"kind": "adapter", "version": record.version, "tags": list(record.tags)}))
            for tag in sorted(tags):
                pointer = tags[tag]
                cards.append(oa.ModelCard(id=tag, created=created, carve={"kind": "tag", "adapter": pointer.name, "version": pointer.version}))
            return JSONResponse(oa.ModelList(data=cards).model_dump())

        return await self._counted("models", handler)

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._counted("completions", lambda: self._generate(request, oa.CompletionRequest, "completions"))

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._counted("chat_completions", lambda: self._generate(request, oa.ChatCompletionRequest, "chat_completions"))

    async def _generate(self, request: Request, model: type[oa._Request], endpoint: str) -> Response:
        """One inference request, holding a place in ``admission`` until its last token is sent (a stream: until it ends or is collected)."""
        self._check_inference_auth(request)
        release = self.admission.enter()
        try:
            response = await self._generate_admitted(request, model, endpoint)
        except BaseException:
            release()
            raise
        if isinstance(response, StreamingResponse):
            weakref.finalize(response.body_iterator, release)  # the stream's end, a client gone before it began included
        else:
            release()
        return response

    async def _generate_admitted(self, request: Request, model: type[oa._Request], endpoint: str) -> Response:
        started = time.perf_counter()
        body = parse_body(await request.body(), model)
        decision = await self._route(body)
        branches = tuple(decision.weighted())
        target = branches[0][0] if len(branches) == 1 else None
        prompts = plan_request(
            body, target, self.tokenizer, self.context, self.config, mixture=branches if len(branches) > 1 else (), space=decision.space,
            token_chars=self.token_chars,
        )
        carve = oa.CarveInfo(
            adapters=[oa.AdapterUse(**u) for u in decision.uses()], mode=decision.mode, space=decision.space if decision.is_mixture else None,
            confidence=decision.confidence, reason=decision.reason,
        )
        chat = isinstance(body, oa.ChatCompletionRequest)
        if body.stream:
            return await self._stream(body, prompts, carve, endpoint, started)

        results = await self._results([job for prompt in prompts for job in prompt.jobs], endpoint, time.time())
        self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        usage = responses.usage(prompts, sum(r.completion_tokens for r in results))
        self.metrics.usage(usage.prompt_tokens, usage.completion_tokens)
        if chat:
            reply: Any = oa.ChatCompletionResponse(
                id=oa.new_id("chatcmpl"), created=oa.now(), model=body.model, usage=usage, carve=carve,
                choices=responses.chat_choices(self.tokenizer, body, results),  # type: ignore[arg-type]
            )
        else:
            reply = oa.CompletionResponse(
                id=oa.new_id("cmpl"), created=oa.now(), model=body.model, usage=usage, carve=carve,
                choices=responses.completion_choices(self.tokenizer, body, prompts, responses.best_candidates(results, body.candidates(), body.n)),  # type: ignore[arg-type]
            )
        return JSONResponse(reply.model_dump())

    async def _results(self, jobs: list[Job], endpoint: str, started_wall: float) -> list[JobResult]:
        """Every choice's whole result, decoded concurrently; when one fails the others are cancelled (their rows freed)."""
        tasks = [asyncio.ensure_future(self._result(job, endpoint, started_wall)) for job in jobs]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()

    async def _result(self, job: Job, endpoint: str, started_wall: float) -> JobResult:
        """One choice's whole result; a prompt echoed without logprobs needs no engine."""
        if not job.needs_engine:
            return JobResult(prompt_tokens=job.prompt_tokens, finish_reason="length")
        self.metrics.adapter_request(_adapter_keys(job))
        result: JobResult = await call_with_retries(lambda: self.engine.generate.remote(job), self.retry)  # a lost replica: sent again
        self._observe_cache(result, job)
        self.metrics.scheduling(result.queue_s, result.token_times, result.load, _adapter_keys(job))
        if result.token_times:
            self.metrics.first_token.labels(endpoint).observe(max(0.0, result.token_times[0] - started_wall))
        if result.error:
            raise _engine_error(result)
        return result

    # -- tokenizer (vLLM's /tokenize, /detokenize, /tokenizer_info: lm-eval's remote tokenizer, token budgeting) --

    @api.post("/tokenize")
    async def tokenize(self, request: Request) -> Response:
        """A prompt's or messages' tokens, as the generation endpoints count them (every adapter shares the base's tokenizer)."""

        async def handler() -> Response:
            self._check_inference_auth(request)
            data = parse_json_object(await request.body())
            body = validate(data, oa.TokenizeChat if "messages" in data else oa.TokenizeCompletion)
            if isinstance(body, oa.TokenizeChat):
                text = render_chat(self.tokenizer, [m.template() for m in body.messages], body.add_generation_prompt)
            else:
                text = body.prompt
            ids = encode_prompt(self.tokenizer, text) if body.add_special_tokens else encode_plain(self.tokenizer, text)
            strs = [self.tokenizer.convert_ids_to_tokens(t) for t in ids] if body.return_token_strs else None
            return JSONResponse(oa.TokenizeResponse(count=len(ids), max_model_len=self.context, tokens=ids, token_strs=strs).model_dump())

        return await self._counted("tokenize", handler)

    @api.post("/detokenize")
    async def detokenize(self, request: Request) -> Response:
        async def handler() -> Response:
            self._check_inference_auth(request)
            body = parse_body(await request.body(), oa.DetokenizeRequest)
            check_token_ids(body.tokens, len(self.tokenizer), "tokens")
            return JSONResponse(oa.DetokenizeResponse(prompt=self.tokenizer.decode(body.tokens)).model_dump())

        return await self._counted("detokenize", handler)

    @api.get("/tokenizer_info")
    async def tokenizer_info(self, request: Request) -> Response:
        async def handler() -> Response:
            self._check_inference_auth(request)
            tok = self.tokenizer
            info = oa.TokenizerInfo(
                tokenizer_class=type(tok).__name__, eos_token=tok.eos_token, bos_token=tok.bos_token, pad_token=tok.pad_token,
                chat_template=tok.chat_template if isinstance(tok.chat_template, str) else None, model_max_length=self.context,
                vocab_size=len(tok), add_bos_token=tok.bos_token_id is not None and encode_prompt(tok, "a")[:1] == [tok.bos_token_id],
            )
            return JSONResponse(info.model_dump())

        return await self._counted("tokenizer_info", handler)

    def _observe_cache(self, event: JobEvent | JobResult, job: Job) -> None:
        self.metrics.cache_events(event.loaded, event.evicted)
        if event.error_kind == "adapter_load":
            for ref in job.refs():
                if ref.key in (event.error or ""):  # the error names the adapter that failed
                    self.metrics.adapter_load_failures.labels(ref.key).inc()

    async def _stream(self, body: Any, prompts: list[PlannedPrompt], carve: oa.CarveInfo, endpoint: str, started: float) -> StreamingResponse:
        """Every choice's engine stream opened (refusals and adapter load errors before any token: HTTP errors), then the SSE response."""
        choices = streaming.choice_streams(body, prompts)
        opened = await asyncio.gather(*(self._open_choice(choice) for choice in choices), return_exceptions=True)
        problem: Optional[BaseException] = next((o for o in opened if isinstance(o, BaseException)), None)
        if problem is None:
            problem = next((_engine_error(first) for first, _ in opened if first.error), None)  # type: ignore[misc]
        if problem is not None:
            for item in opened:
                if not isinstance(item, BaseException) and item[1] is not None:
                    item[1].cancel()
            raise problem
        self.metrics.first_token.labels(endpoint).observe(time.perf_counter() - started)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = self._sse_stream(choices, opened, body.model, carve, prompts, include_usage, endpoint, started)  # type: ignore[arg-type]
        return StreamingResponse(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def _open_choice(self, choice: streaming.ChoiceStream) -> tuple[JobEvent, Any]:
        """A choice's first event and its engine stream (None: an echo of the prompt alone, answered without the engine)."""
        job = choice.job
        if not job.needs_engine:
            return JobEvent(finish_reason="length", prompt_tokens=job.prompt_tokens), None
        self.metrics.adapter_request(_adapter_keys(job))
        first, events = await open_stream(lambda: self.engine.options(stream=True).stream.remote(job), self.retry)  # a lost replica: tried again
        self._observe_cache(first, job)
        return first, events

    async def _sse_stream(
        self, choices: list[streaming.ChoiceStream], opened: list[tuple[JobEvent, Any]], model: str, carve: oa.CarveInfo,
        prompts: list[PlannedPrompt], include_usage: bool, endpoint: str, started: float,
    ) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format, every choice interleaved as decoded, ending with ``data: [DONE]``."""
        chat = bool(choices) and choices[0].chat
        chunk_id, created = oa.new_id("chatcmpl" if chat else "cmpl"), oa.now()

        def chunk(parts: list[Any], usage: Optional[oa.Usage] = None) -> Any:
            if chat:
                return oa.ChatCompletionChunk(id=chunk_id, created=created, model=model, choices=parts, usage=usage, carve=carve)
            return oa.CompletionChunk(id=chunk_id, created=created, model=model, choices=parts, usage=usage, carve=carve)

        if chat:
            for choice in choices:
                yield _sse(chunk([oa.ChatChunkChoice(index=choice.index, delta=oa.ChatDelta(role="assistant", content=""))]))
        firsts = [first for first, _ in opened]
        try:
            async with contextlib.aclosing(streaming.interleave(firsts, [events for _, events in opened])) as interleaved:
                async for index, event in interleaved:
                    choice = choices[index]
                    if event is not firsts[index]:
                        self._observe_cache(event, choice.job)
                    if event.error:
                        yield _sse(_engine_error(event).body())
                        break
                    part = choice.take(event, self.tokenizer)
                    if event.final:
                        self.metrics.scheduling(choice.queue_s, choice.token_times, event.load, _adapter_keys(choice.job))
                    if part is not None:
                        yield _sse(chunk([part]))
        except ApiError as lost:  # a replica died mid-stream: the client has tokens already, so the stream ends with the error
            yield _sse(lost.body())
        finally:  # the client went away, or one choice failed: free the other choices' rows in the engine
            for choice, (_, events) in zip(choices, opened):
                if not choice.finished and events is not None:
                    events.cancel()
        completion_tokens = sum(choice.completion_tokens for choice in choices)
        self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        usage = responses.usage(prompts, completion_tokens)
        self.metrics.usage(usage.prompt_tokens, usage.completion_tokens)
        if include_usage:
            yield _sse(chunk([], usage))
        yield "data: [DONE]\n\n"

    # -- specialization jobs (carve.jobs; each call blocks on the database and files: run off the event loop) --

    async def _jobs_call(self, request: Request, call: Callable[[], tuple[int, dict[str, Any]]]) -> Response:
        async def handler() -> Response:
            self._check_inference_auth(request)
            status, body = await asyncio.to_thread(call)
            return JSONResponse(body, status_code=status)

        return await self._counted("specializations", handler)

    @api.post("/v1/specializations")
    async def submit_specialization(self, request: Request) -> Response:
        raw = await request.body()
        return await self._jobs_call(request, lambda: self.jobs.submit(raw))

    @api.get("/v1/specializations")
    async def list_specializations(self, request: Request, status: Optional[str] = None) -> Response:
        return await self._jobs_call(request, lambda: self.jobs.list(status))

    @api.get("/v1/specializations/{job_id}")
    async def get_specialization(self, request: Request, job_id: str) -> Response:
        return await self._jobs_call(request, lambda: self.jobs.get(job_id))

    @api.delete("/v1/specializations/{job_id}")
    async def cancel_specialization(self, request: Request, job_id: str) -> Response:
        return await self._jobs_call(request, lambda: self.jobs.cancel(job_id))

    # -- operator API -------------------------------------------------------

    @api.get("/v1/adapters")
    async def list_adapters(self, request: Request, tag: Optional[str] = None) -> Response:
        async def handler() -> Response:
            self._check_admin(request)
            records = await self._with_registry(lambda registry: registry.list(tag=tag))
            return JSONResponse(oa.AdapterList(data=[_adapter_info(r) for r in records]).model_dump())

        return await self._counted("adapters", handler)

    @api.post("/v1/adapters")
    async def add_adapter(self, request: Request) -> Response:
        async def handler() -> Response:
            self._check_admin(request)
            content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if content_type in ("", "application/json"):
                body = parse_body(await request.body(), oa.RegisterAdapter)
                source = Path(body.path).expanduser()
                if not source.exists():
                    raise ApiError(400, f"path {body.path!r} does not exist on the server", param="path", code="path_not_found")
                record = await self._register(source, body.name, body.tags, body.card)
            elif content_type in ARCHIVE_TYPES:
                record = await self._register_archive(request)
            else:
                raise ApiError(415, f"unsupported content type {content_type!r}: send JSON {{name, path, tags}} or a .tar.gz/.zip archive")
            return JSONResponse(_adapter_info(record).model_dump(), status_code=201)

        return await self._counted("adapters", handler)

    async def _register_archive(self, request: Request) -> Any:
        name = request.query_params.get("name")
        if not name:
            raise ApiError(422, "an uploaded archive needs the adapter name as the query parameter ?name=", param="name")
        tags = [t.strip() for value in request.query_params.getlist("tags") for t in value.split(",") if t.strip()]
        limit = self.config.max_upload_mb * 1024 * 1024
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the archive is larger than {self.config.max_upload_mb} MB")
        data = await request.body()
        if len(data) > limit:
            raise ApiError(413, f"the archive is larger than {self.config.max_upload_mb} MB")
        scratch = Path(tempfile.mkdtemp(prefix="carve-upload-"))
        try:
            try:
                folder = await asyncio.to_thread(extract_adapter_archive, data, scratch, 4 * limit)
            except ArchiveError as exc:
                raise ApiError(400, str(exc), param="body", code="bad_archive") from None
            return await self._register(folder, name, tags, None)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    async def _register(self, source: Path, name: str, tags: list[str], card: Optional[dict[str, Any]]) -> Any:
        from carve.adapters.registry import RegistryError
        from carve.artifact import AdapterValidationError

        try:
            record = await self._with_registry(lambda registry: registry.add(source, name, tags=tuple(tags), base=self.base, card=card))
        except (RegistryError, AdapterValidationError) as exc:
            raise ApiError(400, str(exc), code="adapter_rejected") from None
        threading.Thread(target=self._warm_router, name="carve-router-warm", daemon=True).start()  # profile it before auto needs it
        return record

    @api.delete("/v1/adapters/{name}")
    async def remove_adapter(self, request: Request, name: str, version: Optional[int] = None) -> Response:
        async def handler() -> Response:
            from carve.adapters.registry import AdapterNotFound, RegistryError

            self._check_admin(request)
            try:
                await self._with_registry(lambda registry: registry.remove(name, version))
            except AdapterNotFound as exc:
                raise ApiError(404, str(exc), param="name", code="adapter_not_found") from None
            except RegistryError as exc:
                raise ApiError(400, str(exc)) from None
            return JSONResponse({"deleted": name, "version": version})

        return await self._counted("adapters", handler)
