"""Named provider pools and A/B splits: model names that stand for a weighted choice.

A *pool* names providers with weights. A request for the pool goes first to one of the pool's routable
providers (registered, not draining, breaker not refusing) drawn at random by weight, then fails over to
the others in weight order; each member is sent its own default model, as in a failover group. A *split*
names variants, each a model name (a model, ``provider:model``, an alias, a failover group or a pool) with
a weight. A request for the split is assigned one variant — the one it forces, else the one its ``user``
hashes to (a stable hash keyed by the split's name, so a user stays in one arm across requests, restarts
and replicas), else one drawn at random by weight — and is routed as if it had asked for that variant's
model; a client may also ask for ``"<split>/<variant>"`` to pin an arm. Each variant keeps its metrics in
memory and bounded: counts and sums since start (or the last reset), latency percentiles over the last
``window`` successful requests.

Everything here is built once from the configuration and read by the request path in its own task. The
only mutable state is the variants' metrics, changed by synchronous calls (no ``await``): under trio each
update is atomic, so no lock and no actor mailbox sits on the request path. ``NamedRoutes.by_name`` maps
every name a client may ask for to what it stands for, so a request for a plain model pays one dict lookup.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random as _random
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import attrs

from ..resilience.failover import ProviderInfo, RouteState
from ..resilience.ordering import split_refused, weighted_first

__all__ = [
    "Arm",
    "NamedRoutes",
    "PinnedArm",
    "Pool",
    "PoolSpec",
    "Split",
    "SplitSpec",
    "UnknownVariant",
    "VariantMetrics",
    "VariantSpec",
    "VariantStats",
    "stable_unit",
]

#: Successful requests whose latencies each variant keeps for percentiles.
DEFAULT_WINDOW = 1024

_EMPTY: Mapping[str, Any] = {}
_NO_STATE = RouteState()


class UnknownVariant(ValueError):
    """A request forced a variant its split does not have; the message lists the ones it has."""


def _weight_ok(w: float) -> bool:
    return isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0


# -- pools ------------------------------------------------------------------------------------------------


@attrs.frozen
class PoolSpec:
    """A pool: providers with weights (same length; all 1.0 when not given).

    ``max_attempts`` None means one attempt per member.
    """

    name: str
    providers: tuple[str, ...] = attrs.field(converter=tuple)
    weights: tuple[float, ...] = attrs.field(default=(), converter=tuple)
    max_attempts: int | None = None

    def __attrs_post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"a pool needs a non-empty name without '/', got {self.name!r}")
        if not self.providers or len(set(self.providers)) != len(self.providers):
            raise ValueError(f"pool {self.name!r} must list distinct providers")
        if not self.weights:
            object.__setattr__(self, "weights", (1.0,) * len(self.providers))
        if len(self.weights) != len(self.providers):
            raise ValueError(f"pool {self.name!r} has {len(self.weights)} weights for {len(self.providers)} providers")
        if not all(_weight_ok(w) for w in self.weights) or sum(self.weights) <= 0:
            raise ValueError(f"pool {self.name!r}: weights must be numbers >= 0, not all 0")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError(f"pool {self.name!r}: max_attempts must be >= 1")

    @classmethod
    def from_config(cls, cfg: Any) -> PoolSpec:
        return cls(cfg.name, cfg.providers, cfg.weights, cfg.max_attempts)


@attrs.define(eq=False)
class Pool:
    """A configured pool as the request path uses it."""

    kind: ClassVar[str] = "pool"

    spec: PoolSpec
    rng: Any = _random
    #: The members as the ordering sees them, each with its weight in this pool: heaviest first, ties in the
    #: configured order.
    members: tuple[ProviderInfo, ...] = attrs.field(init=False)
    #: How a request's members are ordered (``runestone.resilience.ordering``).
    ordering: Any = attrs.field(init=False, factory=weighted_first)

    def __attrs_post_init__(self) -> None:
        pairs = sorted(zip(self.spec.providers, self.spec.weights), key=lambda p: -p[1])
        self.members = tuple(ProviderInfo(n, weight=w) for n, w in pairs)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def max_attempts(self) -> int:
        return self.spec.max_attempts or len(self.spec.providers)

    def order(self, routable: Mapping[str, Any], breakers: Mapping[str, Any] = _EMPTY,
              now: float | None = None) -> list[str]:
        """The members to try, first to try first.

        Only members in ``routable`` (registered and not draining) are returned. The first is drawn by
        weight among those whose breaker does not refuse them at ``now``; the others follow by weight,
        heaviest first, and members whose breaker refuses them come last (by the time the others have
        failed one may be due for a probe). A member of weight 0 is never drawn first while another can be.
        """
        ready, refused = split_refused([m for m in self.members if m.name in routable], breakers, now)
        ordered = self.ordering(ready, _NO_STATE, rng=self.rng)
        ordered.extend(refused)
        return [m.name for m in ordered]

    def describe(self) -> dict:
        spec = self.spec
        total = sum(spec.weights)
        return {
            "id": spec.name,
            "object": "pool",
            "max_attempts": self.max_attempts,
            "providers": [{"name": n, "weight": w, "share": w / total}
                          for n, w in zip(spec.providers, spec.weights)],
        }


# -- metrics ----------------------------------------------------------------------------------------------


@attrs.frozen
class VariantStats:
    """One variant's metrics at one moment (a copy; later requests do not change it)."""

    #: Requests that finished in this arm, whatever their outcome.
    requests: int
    #: Finished with an answer.
    ok: int
    #: Finished with an error the gateway or an upstream caused.
    errors: int
    #: Ended by the client going away: neither a success nor an error of the variant.
    cancelled: int
    #: ``errors / (ok + errors)``; 0.0 before any verdict.
    error_rate: float
    #: Mean whole-request latency of successful requests since start, in ms (None before any).
    latency_mean_ms: float | None
    #: Nearest-rank percentiles over the last ``latency_samples`` successful requests, in ms.
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    latency_samples: int
    #: Mean time to first byte of successful streams, in ms (None before any).
    ttft_mean_ms: float | None
    tokens_in: int
    tokens_out: int
    #: USD, priced by the pricing table (0 for unpriced models).
    cost: float


def _nearest_rank(ordered: list[float], p: float) -> float:
    return ordered[max(0, math.ceil(p * len(ordered)) - 1)]


@attrs.define
class VariantMetrics:
    """One variant's running metrics; updated only by synchronous calls, so each update is atomic."""

    window: int = DEFAULT_WINDOW
    requests: int = 0
    ok: int = 0
    errors: int = 0
    cancelled: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    cost: float = 0.0
    latency_sum: float = 0.0
    ttft_sum: float = 0.0
    ttft_count: int = 0
    latencies: deque = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.latencies = deque(maxlen=self.window)

    def record(self, status: str, http_status: int, latency: float, ttft: float | None, tokens_in: int,
               tokens_out: int, cost: float) -> None:
        """Count one finished request (``status`` "ok" or "error"; HTTP 499 means the client left).

        Latency (seconds) is sampled for successful requests only: a fast failure is not a fast answer.
        """
        self.requests += 1
        if status == "ok":
            self.ok += 1
            self.latency_sum += latency
            self.latencies.append(latency)
            if ttft is not None:
                self.ttft_sum += ttft
                self.ttft_count += 1
        elif http_status == 499:
            self.cancelled += 1
        else:
            self.errors += 1
        if tokens_in or tokens_out:
            self.tokens_in += tokens_in
            self.tokens_out += tokens_out
            self.cost += cost

    def reset(self) -> None:
        window = self.window
        self.__init__(window)  # type: ignore[misc]

    def stats(self) -> VariantStats:
        ordered = sorted(self.latencies)
        judged = self.ok + self.errors
        return VariantStats(
            requests=self.requests,
            ok=self.ok,
            errors=self.errors,
            cancelled=self.cancelled,
            error_rate=self.errors / judged if judged else 0.0,
            latency_mean_ms=self.latency_sum / self.ok * 1000 if self.ok else None,
            latency_p50_ms=_nearest_rank(ordered, 0.50) * 1000 if ordered else None,
            latency_p95_ms=_nearest_rank(ordered, 0.95) * 1000 if ordered else None,
            latency_samples=len(ordered),
            ttft_mean_ms=self.ttft_sum / self.ttft_count * 1000 if self.ttft_count else None,
            tokens_in=self.tokens_in,
            tokens_out=self.tokens_out,
            cost=self.cost,
        )


# -- splits -----------------------------------------------------------------------------------------------


@attrs.frozen
class VariantSpec:
    """One arm of a split: a name, the model it routes to, its weight (0: only when forced)."""

    name: str
    model: str
    weight: float = 1.0

    def __attrs_post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"a variant needs a non-empty name without '/', got {self.name!r}")
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError(f"variant {self.name!r} needs a model")
        if not _weight_ok(self.weight):
            raise ValueError(f"variant {self.name!r}: weight must be a number >= 0")


@attrs.frozen
class SplitSpec:
    name: str
    variants: tuple[VariantSpec, ...] = attrs.field(converter=tuple)

    def __attrs_post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"a split needs a non-empty name without '/', got {self.name!r}")
        if not self.variants:
            raise ValueError(f"split {self.name!r} has no variants")
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"split {self.name!r} names a variant twice")
        if sum(v.weight for v in self.variants) <= 0:
            raise ValueError(f"split {self.name!r}: the variants' weights are all 0")

    @classmethod
    def from_config(cls, cfg: Any) -> SplitSpec:
        return cls(cfg.name, tuple(VariantSpec(v.name, v.model, v.weight) for v in cfg.variants))


@attrs.define(eq=False)
class Arm:
    """A variant at run time: what it routes to and its metrics. ``header`` is ``b"split/variant"``."""

    split: str
    name: str
    model: str
    weight: float
    #: The variant's share of randomly assigned requests.
    ratio: float
    metrics: VariantMetrics
    label: str = attrs.field(init=False)
    header: bytes = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.label = f"{self.split}/{self.name}"
        # Header values must be visible ASCII; names are checked by the config, this guards the rest.
        self.header = self.label.encode("ascii", "replace")


def stable_unit(key: bytes, user: str) -> float:
    """``user`` hashed into [0, 1), the same in every process and on every restart (unlike ``hash()``)."""
    digest = hashlib.blake2b(user.encode("utf-8", "surrogatepass"), digest_size=8, key=key).digest()
    return int.from_bytes(digest, "big") / 18446744073709551616.0  # 2**64


@attrs.define(eq=False)
class Split:
    """A configured split: assigns variants and holds their metrics."""

    kind: ClassVar[str] = "split"

    spec: SplitSpec
    rng: Any = _random
    window: int = DEFAULT_WINDOW
    arms: tuple[Arm, ...] = attrs.field(init=False)
    by_variant: dict[str, Arm] = attrs.field(init=False)
    _bounds: list[float] = attrs.field(init=False, repr=False)
    _total: float = attrs.field(init=False, repr=False)
    _key: bytes = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        total = sum(v.weight for v in self.spec.variants)
        self.arms = tuple(Arm(self.spec.name, v.name, v.model, v.weight, v.weight / total,
                              VariantMetrics(self.window)) for v in self.spec.variants)
        self.by_variant = {a.name: a for a in self.arms}
        bounds = []
        acc = 0.0
        for v in self.spec.variants:
            acc += v.weight
            bounds.append(acc)
        self._bounds = bounds
        self._total = total
        # blake2b takes a key of at most 64 bytes; longer names are cut (config names are at most 64).
        self._key = self.spec.name.encode("utf-8", "surrogatepass")[:64]

    @property
    def name(self) -> str:
        return self.spec.name

    def arm_at(self, u: float) -> Arm:
        """The arm a point ``u`` in [0, 1) falls in, each arm spanning its share; weight 0 spans nothing."""
        i = bisect.bisect_right(self._bounds, u * self._total)
        arms = self.arms
        if i >= len(arms):  # u * total rounded up to the total
            i = len(arms) - 1
            while arms[i].weight <= 0:
                i -= 1
        return arms[i]

    def choose(self, user: Any = None, forced: str | None = None) -> Arm:
        """The arm for one request: ``forced`` by name, else sticky per non-empty string ``user``, else random.

        Raises :class:`UnknownVariant` when ``forced`` names no variant of this split.
        """
        if forced is not None:
            arm = self.by_variant.get(forced)
            if arm is None:
                raise UnknownVariant(f"split {self.name!r} has no variant {forced!r}; its variants are "
                                     + ", ".join(repr(a.name) for a in self.arms))
            return arm
        if user and isinstance(user, str):
            return self.arm_at(stable_unit(self._key, user))
        return self.arm_at(self.rng.random())

    def describe(self) -> dict:
        """The split as ``GET /v1/splits/{name}`` shows it: its variants, ratios and metrics."""
        variants = []
        total = 0
        for arm in self.arms:
            stats = arm.metrics.stats()
            total += stats.requests
            variants.append({"name": arm.name, "model": arm.model, "weight": arm.weight, "ratio": arm.ratio,
                             "metrics": attrs.asdict(stats)})
        for v in variants:
            v["observed_share"] = v["metrics"]["requests"] / total if total else 0.0
        return {"id": self.name, "object": "split", "requests": total, "variants": variants}

    def reset(self) -> None:
        for arm in self.arms:
            arm.metrics.reset()


@attrs.frozen
class PinnedArm:
    """``"<split>/<variant>"``: a request pinned to one arm, counted in that arm's metrics."""

    kind: ClassVar[str] = "split"

    arm: Arm

    def choose(self, user: Any = None, forced: str | None = None) -> Arm:
        if forced is not None and forced != self.arm.name:
            raise UnknownVariant(f"the model {self.arm.label!r} pins variant {self.arm.name!r}; "
                                 f"it cannot be forced to {forced!r}")
        return self.arm


@attrs.define
class NamedRoutes:
    """Every pool and split, and ``by_name``: each name a client may ask for -> Pool, Split or PinnedArm."""

    pools: dict[str, Pool] = attrs.field(factory=dict)
    splits: dict[str, Split] = attrs.field(factory=dict)
    by_name: dict[str, Any] = attrs.field(factory=dict)

    @classmethod
    def build(cls, pools: Iterable[PoolSpec] = (), splits: Iterable[SplitSpec] = (), *, rng: Any = None,
              window: int = DEFAULT_WINDOW) -> NamedRoutes:
        """Raises ValueError when two pools or splits share a name or a variant routes to a split."""
        rng = rng if rng is not None else _random.Random()
        out = cls()
        for spec in pools:
            if spec.name in out.by_name:
                raise ValueError(f"the name {spec.name!r} is given to two pools or splits")
            out.pools[spec.name] = out.by_name[spec.name] = Pool(spec, rng)
        for spec in splits:
            if spec.name in out.by_name:
                raise ValueError(f"the name {spec.name!r} is given to two pools or splits")
            split = out.splits[spec.name] = out.by_name[spec.name] = Split(spec, rng, window)
            for arm in split.arms:
                out.by_name[arm.label] = PinnedArm(arm)
        for split in out.splits.values():
            for arm in split.arms:
                hit = out.by_name.get(arm.model)
                if hit is not None and hit.kind == "split":
                    # Splits of splits would make arms' metrics overlap and could loop.
                    raise ValueError(f"variant {arm.label!r} routes to the split {arm.model!r}; a variant's "
                                     "model must be a model, a provider:model pair, an alias, a group or a pool")
        return out

    @classmethod
    def from_config(cls, config: Any, *, rng: Any = None) -> NamedRoutes:
        return cls.build([PoolSpec.from_config(p) for p in getattr(config, "pools", ())],
                         [SplitSpec.from_config(s) for s in getattr(config, "splits", ())], rng=rng)

    def models(self) -> list[tuple[str, str]]:
        """(name, owner) of each pool and split, for the model listing."""
        return ([(n, "runestone:pool") for n in sorted(self.pools)]
                + [(n, "runestone:split") for n in sorted(self.splits)])
