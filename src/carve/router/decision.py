"""Turning a request into [(adapter, weight)]: explicit names, content-based choice, mixtures.

A request says what it wants with its ``model`` field and an optional extra
body field ``carve``:

- ``model="base"``: the base model answers;
- ``model=<adapter name | name:version | domain tag>``: that adapter (explicit);
- ``model="auto"``: the adapter whose profile best matches the request's text,
  or the base when no adapter's confidence reaches the threshold;
- ``model="auto", carve={"auto": {"top_k": 2}}``: a mixture of the best k
  adapters above the threshold, weighted by softmax(confidence / temperature);
- ``model="auto", carve={"mix": {"biomedical": 0.7, "finance": 0.3}}``: the
  given mixture (names or tags), weights normalised to sum to 1.

``carve.space`` picks how a mixture is decoded: ``"output"`` (default; the
engine's ``mixture`` rule over one branch per adapter) or ``"weights"`` (one
adapter merged in weight space, see carve.engine.adapter_cache). The decision is
plain data, so the server can name it in the response and count it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from carve.adapters.registry import AdapterRecord, Registry, RegistryError
from carve.artifact import AUTO_MODEL, BASE_MODEL, PROFILE_FILE, AdapterRef
from carve.common.errors import error_field
from carve.router.profiles import Backend, Scorer, make_scorer, profile_key

MAX_BRANCHES = 8
Mode = Literal["explicit", "auto", "mixture", "base"]
Space = Literal["output", "weights"]


class RoutingError(ValueError):
    """A request the router refuses; ``param`` is the request field at fault, ``status`` the HTTP status to answer."""

    def __init__(self, message: str, param: str = "model", status: int = 400, code: str = "invalid_routing"):
        self.param, self.status, self.code = param, status, code
        super().__init__(message)


class AutoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    top_k: int = Field(1, ge=1, le=MAX_BRANCHES, description="Mix the best k adapters above the threshold (1: pick one).")
    threshold: Optional[float] = Field(None, ge=0.0, le=1.0, description="Override the server's confidence threshold.")


class CarveOptions(BaseModel):
    """The request body's ``carve`` field."""

    model_config = ConfigDict(extra="forbid")

    mix: Optional[dict[str, float]] = Field(None, description="Adapter name or domain tag -> positive weight.")
    auto: Optional[AutoOptions] = None
    space: Space = "output"

    @field_validator("mix")
    @classmethod
    def _weights(cls, mix: Optional[dict[str, float]]) -> Optional[dict[str, float]]:
        if mix is None:
            return None
        if not mix:
            raise ValueError("mix is empty: name at least one adapter or tag with a positive weight")
        if len(mix) > MAX_BRANCHES:
            raise ValueError(f"mix names {len(mix)} adapters, at most {MAX_BRANCHES} are allowed")
        bad = [f"{name}={weight}" for name, weight in mix.items() if not (math.isfinite(weight) and weight > 0)]
        if bad:
            raise ValueError(f"mix weights must be positive and finite: {', '.join(bad)}")
        return mix

    @classmethod
    def parse(cls, value: Any) -> "CarveOptions":
        """From the raw ``carve`` body value; RoutingError naming the bad field."""
        if value is None:
            return cls()
        if isinstance(value, CarveOptions):
            return value
        try:
            options = cls.model_validate(value)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = error_field(err, prefix=("carve",))
            raise RoutingError(f"{where}: {err['msg']}", param=where, status=422, code="invalid_field") from None
        if options.mix is not None and options.auto is not None:
            raise RoutingError("carve: give either mix (fixed weights) or auto (chosen by content), not both", param="carve")
        return options


class RouterConfig(BaseModel):
    """Settings of content-based routing."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["auto", "embedding", "bm25"] = Field("auto", description="embedding when its model is installed, else bm25.")
    threshold: Optional[float] = Field(None, ge=0.0, le=1.0, description="Below this confidence the base answers (default: 0.2 embeddings, 0.6 BM25).")
    temperature: float = Field(0.05, gt=0.0, description="Softmax temperature over confidences for auto mixtures.")

    def threshold_for(self, backend: Backend) -> float:
        # Embeddings, measured with seed-only profiles (benchmarks/router.py): dev requests
        # (instruction + input) score >= 0.27 against their own domain in 95% of cases,
        # general-purpose prompts score 0.13 (median) to 0.25 (max). 0.2 keeps nearly all
        # domain requests and sends most off-domain ones to the base; see the README figures.
        if self.threshold is not None:
            return self.threshold
        return 0.2 if backend == "embedding" else 0.6


class RoutedBranch(BaseModel):
    """One adapter (None: the base model) and its normalised weight."""

    adapter: Optional[AdapterRecord] = None
    weight: float = 1.0

    @property
    def key(self) -> Optional[str]:
        return profile_key(self.adapter) if self.adapter is not None else None


class RoutingDecision(BaseModel):
    """What answers a request, and why."""

    branches: list[RoutedBranch]
    mode: Mode
    space: Space = "output"
    confidence: Optional[float] = None  # auto: the chosen adapter's confidence
    reason: str
    scores: dict[str, float] = Field(default_factory=dict)  # auto: every candidate's confidence, by name@vversion

    @property
    def is_base(self) -> bool:
        return all(b.adapter is None for b in self.branches)

    @property
    def is_mixture(self) -> bool:
        return len(self.branches) > 1

    def uses(self) -> list[dict[str, Any]]:
        """[{name, version, weight}] of the adapters used: what a response reports (empty for the base)."""
        return [{"name": b.adapter.name, "version": b.adapter.version, "weight": b.weight} for b in self.branches if b.adapter is not None]

    def weighted(self) -> list[tuple[Optional[AdapterRef], float]]:
        """[(adapter reference or None for the base, weight)]: what an engine decodes (carve.engine.batching)."""
        return [(AdapterRef.of(b.adapter) if b.adapter is not None else None, b.weight) for b in self.branches]

    def target_label(self) -> str:
        """A metrics label: 'base', an adapter name, or 'a+b' for a mixture."""
        names = sorted(b.adapter.name for b in self.branches if b.adapter is not None)
        return "+".join(names) if names else BASE_MODEL


class Router:
    """Routes requests against one registry (restricted to one base's adapters when ``base_fingerprint`` is set)."""

    def __init__(self, registry: Registry, config: RouterConfig | None = None, base_fingerprint: str | None = None, scorer: Scorer | None = None):
        self.registry = registry
        self.config = config or RouterConfig()
        self.base_fingerprint = base_fingerprint
        self.scorer = scorer or make_scorer(registry.root, self.config.backend)

    # -- the entry point ------------------------------------------------------

    def route(self, model: str, text: str = "", carve: Any = None) -> RoutingDecision:
        """The decision for one request; RoutingError (unknown name, bad weights, contradictions) changes nothing."""
        options = CarveOptions.parse(carve)
        if options.mix is not None or options.auto is not None:
            if model != AUTO_MODEL:
                field = "mix" if options.mix is not None else "auto"
                raise RoutingError(f"carve.{field} needs model 'auto', got model {model!r}", param="model")
            if options.mix is not None:
                return self._mix(options.mix, options.space)
            assert options.auto is not None
            return self._auto(text, options.auto.top_k, options.auto.threshold, options.space)
        if model == BASE_MODEL:
            return RoutingDecision(branches=[RoutedBranch()], mode="base", reason="model 'base' asked for")
        if model == AUTO_MODEL:
            return self._auto(text, 1, None, "output")
        record = self._resolve(model, "model")
        how = "adapter" if record.name == model.split(":")[0] else f"domain tag {model!r} ->"
        return RoutingDecision(branches=[RoutedBranch(adapter=record)], mode="explicit", reason=f"{how} {record.name} v{record.version}")

    def warm(self) -> None:
        """Build every candidate's profile now (the server calls this at start, and after registering an adapter)."""
        for record in self.candidates():
            if hasattr(self.scorer, "vectors"):
                self.scorer.vectors(record)  # type: ignore[attr-defined]

    # -- candidates and names ---------------------------------------------------

    def candidates(self) -> list[AdapterRecord]:
        """The adapters auto routing chooses from: what each domain tag points to, and each untagged adapter's latest version."""
        fp = self.base_fingerprint
        chosen: dict[str, AdapterRecord] = {}
        for _tag, (record, _pinned) in sorted(self.registry.tags(base_fingerprint=fp).items()):
            chosen.setdefault(profile_key(record), record)
        for record in self.registry.list(base_fingerprint=fp):
            if not record.tags:
                chosen.setdefault(profile_key(record), record)
        return list(chosen.values())

    def _resolve(self, name: str, param: str) -> AdapterRecord:
        if name in (BASE_MODEL, AUTO_MODEL):
            raise RoutingError(f"{param}: {name!r} is not an adapter; name adapters or domain tags", param=param)
        try:
            return self.registry.resolve(name, base_fingerprint=self.base_fingerprint)
        except RegistryError as exc:
            raise RoutingError(str(exc), param=param, status=404, code="model_not_found") from None

    # -- modes ------------------------------------------------------------------

    def _mix(self, mix: dict[str, float], space: Space) -> RoutingDecision:
        records: dict[str, tuple[Any, float, str]] = {}
        for name, weight in mix.items():
            record = self._resolve(name, f"carve.mix.{name}")
            key = profile_key(record)
            if key in records:
                raise RoutingError(
                    f"carve.mix names adapter {record.name} v{record.version} twice (as {records[key][2]!r} and {name!r})", param=f"carve.mix.{name}"
                )
            records[key] = (record, weight, name)
        total = sum(w for _, w, _ in records.values())
        branches = [RoutedBranch(adapter=r, weight=w / total) for r, w, _ in records.values()]
        reason = "mixture asked for: " + ", ".join(f"{n}={w / total:.3g}" for _, w, n in records.values())
        mode: Mode = "mixture" if len(branches) > 1 else "explicit"
        return RoutingDecision(branches=branches, mode=mode, space=space, reason=reason)

    def _auto(self, text: str, top_k: int, threshold: Optional[float], space: Space) -> RoutingDecision:
        if not text.strip():
            raise RoutingError("model 'auto' needs text to route on: the prompt (or last user message) is empty", param="model")
        candidates = self.candidates()
        scores = self.scorer.confidences(text, candidates) if candidates else {}
        return self._decide(candidates, scores, top_k, threshold, space)

    def route_auto_many(self, texts: Sequence[str], top_k: int = 1, threshold: Optional[float] = None) -> list[RoutingDecision]:
        """``model="auto"`` for many texts at once (queries embedded in batches): offline evaluation, batch jobs."""
        candidates = self.candidates()
        if not candidates:
            return [self._decide([], {}, top_k, threshold, "output") for _ in texts]
        return [self._decide(candidates, scores, top_k, threshold, "output") for scores in self.scorer.confidences_many(list(texts), candidates)]

    def _decide(self, candidates: list[Any], scores: dict[str, float], top_k: int, threshold: Optional[float], space: Space) -> RoutingDecision:
        """The auto decision from every candidate's confidence: best k at or above the threshold, else the base."""
        limit = threshold if threshold is not None else self.config.threshold_for(self.scorer.backend)
        if not candidates:
            return RoutingDecision(branches=[RoutedBranch()], mode="base", reason="auto: no adapter is registered; the base answers")
        by_key = {profile_key(r): r for r in candidates}
        ranked = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))
        best_key, best = ranked[0]
        shown = ", ".join(f"{k}={v:.3f}" for k, v in ranked[:4])
        if best < limit:
            return RoutingDecision(
                branches=[RoutedBranch()], mode="base", confidence=best, scores=scores,
                reason=f"auto ({self.scorer.backend}): best confidence {best:.3f} < threshold {limit:.3f}; the base answers ({shown})",
            )
        kept = [(k, v) for k, v in ranked[:top_k] if v >= limit]
        weak = [k for k, _ in kept if not (Path(by_key[k].path) / PROFILE_FILE).is_file()]
        note = f"; {', '.join(weak)} profiled from the card only" if weak else ""
        if len(kept) == 1:
            return RoutingDecision(
                branches=[RoutedBranch(adapter=by_key[best_key])], mode="auto", confidence=best, scores=scores,
                reason=f"auto ({self.scorer.backend}): {best_key} confidence {best:.3f} >= {limit:.3f} ({shown}){note}",
            )
        exps = [math.exp((v - best) / self.config.temperature) for _, v in kept]
        total = sum(exps)
        branches = [RoutedBranch(adapter=by_key[k], weight=e / total) for (k, _), e in zip(kept, exps)]
        return RoutingDecision(
            branches=branches, mode="mixture", space=space, confidence=best, scores=scores,
            reason=f"auto top-{top_k} ({self.scorer.backend}): " + ", ".join(f"{k} w={e / total:.3f}" for (k, _), e in zip(kept, exps)) + note,
        )


def routing_text(messages_or_prompt: str | Sequence[dict[str, Any]]) -> str:
    """What auto routing reads: a completion's prompt, or a chat's last user message."""
    if isinstance(messages_or_prompt, str):
        return messages_or_prompt
    for message in reversed(list(messages_or_prompt)):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):  # OpenAI content parts
                return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            return str(content or "")
    return ""
