"""The AP's one config object: defaults, overridden by a TOML file, overridden by flags."""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from apdispatch.ap.overload import OverloadConfig
from apdispatch.routing.estimator import ALPHA as ESTIMATOR_ALPHA
from apdispatch.routing.estimator import DEFAULT_QUEUE_MODEL, QUEUE_MODELS
from apdispatch.routing.outlier import OutlierConfig

_OUTLIER = OutlierConfig()


class ConfigError(ValueError):
    """A config file or flag with a bad value; the message names the key."""


def check_listen(listen: str) -> None:
    """``host:port``, the port 0 (any free one) to 65535; an IPv6 host in brackets."""
    host, colon, port = listen.rpartition(":")
    if not (colon and host and port.isdigit() and int(port) <= 65535):
        raise ConfigError(f"listen: expected host:port with a port of 0 to 65535, got {listen!r}")


# A TOML value's kind per field type, as written in APConfig's annotations.
_KINDS: dict[str, tuple[tuple[type, ...], str]] = {
    "str": ((str,), "a string"),
    "int": ((int,), "an integer"),
    "float": ((int, float), "a number"),
    "bool": ((bool,), "true or false"),
    "dict[str, Any]": ((dict,), "a table"),
}


def _typed(key: str, annotation: str, value: Any) -> Any:
    """``value`` as the field ``key`` holds it (an integer for a float field becomes a float)."""
    kinds, words = _KINDS[annotation]
    # bool is an int to Python, not to a config file.
    fits = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not fits:
        raise ConfigError(f"{key}: must be {words}, got {value!r}")
    return float(value) if annotation == "float" else value


@dataclass(frozen=True, slots=True)
class APConfig:
    listen: str = "127.0.0.1:50051"
    policy: str = "fastest"
    seed: int = 0
    # A worker that has not sent a heartbeat for this long is forgotten.
    lease_s: float = 5.0
    # Weight of one reply in the latency estimator's running means (network, compute fit).
    estimator_alpha: float = ESTIMATOR_ALPHA
    # How the wait for a busy worker's slot is predicted (apdispatch.routing.estimator.QUEUE_MODELS):
    # "count", every request ahead at a whole compute; "work", when each slot is predicted free
    # (no longer than "count" says).
    queue_model: str = DEFAULT_QUEUE_MODEL
    # Cascades (apdispatch.routing.cascade): a request whose accuracy floor no edge variant
    # reaches may go first to a light variant with a calibrated threshold for it, and only
    # its unsure answers on to an accurate target; escalation rates learned with this weight.
    cascade: bool = False
    cascade_rate_alpha: float = 0.02
    # How the AP talks to workers that serve ModelStreamInfer: "stream" keeps one
    # bidirectional stream per worker (cheaper per request than a unary call in
    # Python gRPC); "unary" sends one ModelInfer per request.
    forward_mode: str = "stream"
    # Bad-input limits: requests over them get INVALID_ARGUMENT naming the field.
    max_tensor_bytes: int = 4 * 1024 * 1024
    # The longest deadline a request may ask for: the AP and its workers hold a
    # timer per request, and an hour is far beyond any inference SLA.
    max_deadline_ms: float = 3_600_000.0
    # The largest request message, well below gRPC's 64 MiB: a bigger one is refused with RESOURCE_EXHAUSTED.
    max_message_bytes: int = 16 * 1024 * 1024
    # Replies a stream may have pending (in progress or unsent) before the AP stops reading it.
    stream_max_pending: int = 256
    # Extra time, beyond the request's deadline, the AP waits for a worker's
    # reply so that a late reply is still delivered (and counted late).
    late_grace_ms: float = 0.0
    # Time a reply needs to reach its client, kept out of each request's budget:
    # admission plans to finish this much before the deadline, and a reply ready
    # later than that counts late, so that an ok reaches the client in time.
    reply_margin_ms: float = 2.0
    # Overload (apdispatch.ap.overload): at most max_in_flight requests admitted
    # and unanswered; the limit falls (by decrease_factor per lag_interval_ms,
    # not below min_in_flight) while the event loop's lag, sampled every
    # lag_probe_ms, stays above lag_target_ms, and rises by increase_step while
    # it is below. A request over the limit is rejected at once.
    max_in_flight: int = 1024
    min_in_flight: int = 16
    lag_target_ms: float = 5.0
    lag_interval_ms: float = 100.0
    lag_probe_ms: float = 5.0
    decrease_factor: float = 0.75
    increase_step: int = 8
    # Outlier detection (apdispatch.routing.outlier.OutlierConfig, whose fields these
    # are, prefixed): a worker whose link breaks is ejected from routing at once,
    # one with outlier_consecutive_errors error replies or outlier_consecutive_slow
    # attributable deadline misses in a row too; it is probed back (OIP
    # ServerReady, within outlier_probe_timeout_ms) after outlier_base_ejection_ms
    # times its ejection count, at most outlier_max_ejection_ms; at most
    # outlier_max_ejection_percent of a task's workers are out at once.
    outlier_consecutive_errors: int = _OUTLIER.consecutive_errors
    outlier_consecutive_slow: int = _OUTLIER.consecutive_slow
    outlier_base_ejection_ms: float = _OUTLIER.base_ejection_ms
    outlier_max_ejection_ms: float = _OUTLIER.max_ejection_ms
    outlier_max_ejection_percent: float = _OUTLIER.max_ejection_percent
    outlier_probe_timeout_ms: float = _OUTLIER.probe_timeout_ms
    # Once started, the AP freezes its start-up heap out of garbage collection and
    # collects its young generation every gc_young_threshold allocations (CPython:
    # 700), so that collections stop its loop less often (docs/operations.md); 0: CPython's.
    gc_young_threshold: int = 20_000
    log_level: str = "info"
    log_format: str = "json"
    summary_interval_s: float = 10.0
    # Prometheus /metrics on this port, on the listen address's host (docs/operations.md, "Metrics"); 0: none.
    metrics_port: int = 0
    shutdown_grace_s: float = 5.0
    # On SIGTERM, how long the AP keeps its port open answering health checks
    # NOT_SERVING (and refusing new work) before it closes it, so that a load
    # balancer's or Kubernetes' probe sees the drain; taken from the grace period.
    drain_notice_s: float = 0.0
    # Learned policies only. "" starts from the policy's shipped checkpoint and
    # writes nothing; a path is loaded when it exists (else the shipped one is
    # the start), then written every checkpoint_interval_s and on shutdown, so
    # that a restarted AP resumes where the last one stopped.
    checkpoint: str = ""
    checkpoint_interval_s: float = 60.0
    # Guard settings of a learned policy or a rule (apdispatch.learned.guard_config.GuardConfig),
    # a [guards] table: they replace the checkpoint's own, and are saved with the next checkpoint.
    guards: dict[str, Any] = field(default_factory=dict)
    # Security (README, "Security"); all empty: plaintext and open, for local development.
    # PEM certificate and key: the AP serves TLS.
    tls_cert: str = ""
    tls_key: str = ""
    # PEM CA: callers present a certificate it signed (its OU is their role); workers are reached by mTLS.
    tls_ca: str = ""
    # TOML file of bearer tokens (apdispatch.ap.auth): apps, their rate limits, workers, operators.
    tokens_file: str = ""

    def validate(self) -> APConfig:
        check_listen(self.listen)
        if self.seed < 0:
            raise ConfigError(f"seed: must be >= 0, got {self.seed}")
        if self.lease_s <= 0:
            raise ConfigError("lease_s: must be > 0")
        if not 0 < self.estimator_alpha <= 1:
            raise ConfigError("estimator_alpha: must be in (0, 1]")
        if self.queue_model not in QUEUE_MODELS:
            raise ConfigError(f"queue_model: must be one of {', '.join(QUEUE_MODELS)}")
        if not isinstance(self.cascade, bool):
            raise ConfigError(f"cascade: must be true or false, got {self.cascade!r}")
        if not 0.0 < self.cascade_rate_alpha <= 1.0:
            raise ConfigError(f"cascade_rate_alpha: must be in (0, 1], got {self.cascade_rate_alpha}")
        if self.forward_mode not in ("stream", "unary"):
            raise ConfigError("forward_mode: must be 'stream' or 'unary'")
        if self.max_tensor_bytes <= 0:
            raise ConfigError("max_tensor_bytes: must be > 0")
        if not (math.isfinite(self.drain_notice_s) and self.drain_notice_s >= 0):
            raise ConfigError("drain_notice_s: must be a finite number >= 0")
        if not (math.isfinite(self.reply_margin_ms) and self.reply_margin_ms >= 0):
            raise ConfigError("reply_margin_ms: must be a finite number >= 0")
        if not self.max_deadline_ms > 0:
            raise ConfigError("max_deadline_ms: must be > 0")
        if not 0 < self.max_message_bytes <= 64 * 1024 * 1024:
            raise ConfigError("max_message_bytes: must be > 0 and at most 64 MiB")
        if self.stream_max_pending < 1:
            raise ConfigError("stream_max_pending: must be >= 1")
        try:
            self.overload().validate()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        try:
            self.outlier().validate()
        except ValueError as exc:
            raise ConfigError(f"outlier_{exc}") from None
        if self.gc_young_threshold < 0:
            raise ConfigError("gc_young_threshold: must be >= 0 (0: CPython's default)")
        if self.log_format not in ("json", "console"):
            raise ConfigError("log_format: must be 'json' or 'console'")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError("metrics_port: must be a port number, or 0 for none")
        if self.summary_interval_s <= 0:
            raise ConfigError("summary_interval_s: must be > 0")
        if self.checkpoint_interval_s <= 0:
            raise ConfigError("checkpoint_interval_s: must be > 0")
        if not isinstance(self.guards, dict):
            raise ConfigError("guards: must be a table of guard settings")
        from apdispatch.learned.guard_config import GuardConfig

        try:
            GuardConfig().with_overrides(self.guards)
        except ValueError as exc:
            raise ConfigError(f"guards.{exc}") from None
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("tls_cert, tls_key: give both or neither")
        if self.tls_ca and not self.tls_cert:
            raise ConfigError("tls_ca: needs tls_cert and tls_key (mutual TLS is TLS)")
        if self.tokens_file:
            from apdispatch.ap.auth import Tokens, TokensFileError

            try:
                Tokens.load(self.tokens_file)
            except TokensFileError as exc:
                raise ConfigError(str(exc)) from None
        return self

    def overload(self) -> OverloadConfig:
        return OverloadConfig(
            max_in_flight=self.max_in_flight,
            min_in_flight=self.min_in_flight,
            lag_target_ms=self.lag_target_ms,
            lag_interval_ms=self.lag_interval_ms,
            lag_probe_ms=self.lag_probe_ms,
            decrease_factor=self.decrease_factor,
            increase_step=self.increase_step,
        )

    def outlier(self) -> OutlierConfig:
        return OutlierConfig(**{f.name: getattr(self, f"outlier_{f.name}") for f in fields(OutlierConfig)})

    def with_overrides(self, **overrides: Any) -> APConfig:
        """A copy with every override that is not None applied (``guards`` merge into the file's)."""
        changes = {k: v for k, v in overrides.items() if v is not None}
        if "guards" in changes:
            changes["guards"] = {**self.guards, **changes["guards"]}
        return replace(self, **changes)


def load_config(path: Path | None = None, **overrides: Any) -> APConfig:
    """Defaults, then the TOML file (a flat table, or an ``[ap]`` table), then flags."""
    config = APConfig()
    if path is not None:
        try:
            doc = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: {exc}") from exc
        table = doc.get("ap", doc)
        known = {f.name: str(f.type) for f in fields(APConfig)}
        unknown = sorted(set(table) - set(known))
        if unknown:
            raise ConfigError(f"{path}: unknown keys {', '.join(unknown)}")
        config = replace(config, **{key: _typed(key, known[key], value) for key, value in table.items()})
    return config.with_overrides(**overrides).validate()
