"""A/B experiments: a model name that splits traffic between served models (arms).

Declared in a TOML file (`MERGESERVE_EXPERIMENTS__FILE`)::

    [experiments.ties-vs-dynamic]
    arms = { "static:ties" = 1, "dynamic" = 1 }   # served model -> traffic weight
    header = "x-mergeserve-user"                  # optional; this is the default

A request for `model="ties-vs-dynamic"` is assigned an arm by a deterministic hash of
(experiment, sticky key), where the sticky key is the request's `user` field, else the
header, else a random one (that request alone). The same key always gets the same arm,
across requests and restarts, as long as the experiment's name and arms are unchanged;
changing the weights moves only the keys whose hash falls in the moved share. The arm
is reported in the `merge` object (`arm`, `experiment`) and the `x-mergeserve-arm` header;
per-arm metrics carry the experiment's name.

Feedback (`POST /v1/feedback {"id", "score"}`) is recorded against the arm that answered
the response `id`, as a metric and as a line of an append-only JSONL log.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import queue
import secrets
import threading
import time
import tomllib
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from mergeserve.adapters.peft_io import NAME_RE
from mergeserve.errors import (
    AuthenticationError,
    ConfigurationError,
    EngineOverloadedError,
    InvalidRequestError,
    MergeserveError,
)

log = logging.getLogger(__name__)

DEFAULT_HEADER = "x-mergeserve-user"
_RESERVED = ("base", "dynamic")  # and no ':' (expert:…, static:…, dynamic:…)


class ArmUnavailableError(MergeserveError):
    """An experiment's arm is not served at the moment (an expert was removed)."""

    status_code = 503
    error_type = "service_unavailable_error"


class FeedbackNotFoundError(MergeserveError):
    status_code = 404
    error_type = "not_found_error"


class FeedbackConflictError(MergeserveError):
    status_code = 409
    error_type = "conflict_error"


class FeedbackBacklogError(EngineOverloadedError):
    """The feedback log's writer is behind (503: retry)."""


@dataclass(frozen=True)
class Arm:
    model: str
    weight: float


@dataclass(frozen=True)
class Experiment:
    name: str
    arms: tuple[Arm, ...]
    header: str = DEFAULT_HEADER

    def __post_init__(self) -> None:
        if not NAME_RE.match(self.name) or self.name in _RESERVED or ":" in self.name:
            raise ConfigurationError(
                f"experiment name {self.name!r}: 1-64 letters, digits, '_', '.', '-', and "
                "not a served model's name (base, dynamic, expert:…, static:…)"
            )
        if not self.arms:
            raise ConfigurationError(f"experiment {self.name!r} has no arms")
        models = [a.model for a in self.arms]
        if len(set(models)) != len(models):
            raise ConfigurationError(f"experiment {self.name!r} names an arm twice")
        for a in self.arms:
            if not (math.isfinite(a.weight) and a.weight >= 0):
                raise ConfigurationError(
                    f"experiment {self.name!r}: arm {a.model!r} has weight {a.weight}; "
                    "weights are finite and >= 0"
                )
        if not sum(a.weight for a in self.arms) > 0:
            raise ConfigurationError(f"experiment {self.name!r}: every weight is zero")

    @property
    def shares(self) -> dict[str, float]:
        total = sum(a.weight for a in self.arms)
        return {a.model: a.weight / total for a in self.arms}

    def assign(self, key: str) -> str:
        """The arm (a served model name) of sticky key `key`: a hash, not a coin."""
        digest = hashlib.sha256(f"mergeserve-ab/1\0{self.name}\0{key}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
        total = sum(a.weight for a in self.arms)
        acc = 0.0
        for a in self.arms:
            acc += a.weight / total
            if u < acc:
                return a.model
        return next(a.model for a in reversed(self.arms) if a.weight > 0)  # rounding at 1

    def sticky_key(self, user: str | None, headers: Mapping[str, str]) -> tuple[str, str]:
        """(key, where it came from: user | header | random)."""
        if user:
            return user, "user"
        value = headers.get(self.header)
        if value:
            return value, "header"
        return uuid.uuid4().hex, "random"


def parse_experiments(
    data: Mapping[str, object], source: str = "<config>"
) -> dict[str, Experiment]:
    table = data.get("experiments", {})
    if not isinstance(table, dict):
        raise ConfigurationError(f"{source}: [experiments] must be a table")
    out = {}
    for name, spec in table.items():
        if not isinstance(spec, dict):
            raise ConfigurationError(f"{source}: experiments.{name} must be a table")
        unknown = set(spec) - {"arms", "header"}
        if unknown:
            raise ConfigurationError(
                f"{source}: experiments.{name}: unknown keys {sorted(unknown)} (arms, header)"
            )
        arms = spec.get("arms")
        if not isinstance(arms, dict) or not arms:
            raise ConfigurationError(
                f'{source}: experiments.{name}.arms must be a table {{"model" = weight, …}}'
            )
        parsed = []
        for model, w in arms.items():
            if isinstance(w, bool) or not isinstance(w, int | float):
                raise ConfigurationError(
                    f"{source}: experiments.{name}.arms.{model!r}: weight must be a number"
                )
            parsed.append(Arm(str(model), float(w)))
        header = spec.get("header", DEFAULT_HEADER)
        if not isinstance(header, str) or not header:
            raise ConfigurationError(f"{source}: experiments.{name}.header must be a string")
        out[name] = Experiment(name, tuple(parsed), header.lower())
    return out


def load_experiments(path: Path) -> dict[str, Experiment]:
    """The experiments of a TOML file; ConfigurationError saying what is wrong."""
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise ConfigurationError(f"experiments file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigurationError(f"experiments file {path}: {e}") from None
    return parse_experiments(data, str(path))


def check_arms(experiments: Iterable[Experiment], served: Iterable[str]) -> None:
    """Every arm must be a served model (checked at start-up)."""
    names = set(served)
    for exp in experiments:
        if exp.name in names:
            raise ConfigurationError(f"experiment {exp.name!r} has the name of a served model")
        missing = [a.model for a in exp.arms if a.model not in names]
        if missing:
            raise ConfigurationError(
                f"experiment {exp.name!r}: arms {missing} are not served models "
                f"(served: {', '.join(sorted(names))})"
            )


# ----------------------------------------------------------------------------- feedback


@dataclass(frozen=True)
class Answered:
    """What answered a response id: enough to record feedback against its arm."""

    model: str
    """The model the client asked for (an experiment's name, or a served model)."""
    arm: str
    """The served arm (`dynamic` resolved to its mode), as the metrics label it."""
    experiment: str | None
    created: float
    choice: str | None = None
    """The experiment's arm as its config names it (`dynamic`, not `dynamic:exact`)."""


SCORE_RANGE = (-100.0, 100.0)
"""The scores `POST /v1/feedback` takes (thumbs as 0/1, stars, percentages all fit): a
bounded score keeps one client from swamping the A/B means and the Prometheus sums."""


class FeedbackBook:
    """Recent response ids -> their arm (bounded), and the feedback log.

    Feedback for an id this server did not answer, or answered more than `window`
    responses ago, is refused (404); a second feedback for one id is refused (409); a
    score outside SCORE_RANGE is refused (400). The log (JSONL) is written by a thread of
    its own, never on the request path nor under the lock the event loop takes, and
    rotated at `max_bytes` (`log_path.1` … `log_path.<keep>`, oldest dropped).
    """

    def __init__(
        self,
        log_path: Path,
        window: int = 100_000,
        max_bytes: int = 64 << 20,
        keep: int = 3,
        token: str | None = None,
    ):
        self.log_path = log_path
        self._token = token
        self.window = window
        self.max_bytes = max_bytes
        self.keep = keep
        self._recent: OrderedDict[str, Answered] = OrderedDict()
        self._rated: set[str] = set()
        self._lock = threading.Lock()
        self._queue: queue.Queue[dict[str, object] | None] = queue.Queue(maxsize=10_000)
        self._writer = threading.Thread(target=self._write_loop, name="feedback-log", daemon=True)
        self._writer.start()

    def answered(self, response_id: str, answered: Answered) -> None:
        with self._lock:
            self._recent[response_id] = answered
            while len(self._recent) > self.window:
                old, _ = self._recent.popitem(last=False)
                self._rated.discard(old)

    def check_token(self, authorization: str) -> None:
        """Refuse (401) a feedback call without the bearer token, when one is set."""
        if self._token is None:
            return
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
            given.strip().encode(), self._token.encode()
        ):
            raise AuthenticationError(
                "feedback needs 'Authorization: Bearer <token>' (experiments.feedback_token)"
            )

    def record(self, response_id: str, score: float, comment: str | None = None) -> Answered:
        """Take the feedback and queue its log line (cheap: the log's thread writes it)."""
        lo, hi = SCORE_RANGE
        if not (math.isfinite(score) and lo <= score <= hi):
            raise InvalidRequestError(
                f"score must be a number in [{lo:g}, {hi:g}], not {score!r}", param="score"
            )
        with self._lock:
            a = self._recent.get(response_id)
            if a is None:
                raise FeedbackNotFoundError(
                    f"no response {response_id!r} among the last {self.window} this server "
                    "answered",
                    param="id",
                )
            if response_id in self._rated:
                raise FeedbackConflictError(
                    f"response {response_id!r} already has feedback", param="id"
                )
            line: dict[str, object] = {
                "time": round(time.time(), 3),
                "id": response_id,
                "model": a.model,
                "experiment": a.experiment,
                "arm": a.arm,
                "choice": a.choice,
                "score": score,
            }
            if comment:
                line["comment"] = comment
            try:
                self._queue.put_nowait(line)
            except queue.Full:
                raise FeedbackBacklogError("the feedback log is behind; retry shortly") from None
            self._rated.add(response_id)
        return a

    def flush(self) -> None:
        """Wait until every queued line is written."""
        self._queue.join()

    def close(self) -> None:
        """Write what is queued, then stop the log's thread; idempotent."""
        if self._writer.is_alive():
            self._queue.put(None)
            self._writer.join(10)

    def _write_loop(self) -> None:
        while True:
            line = self._queue.get()
            try:
                if line is None:
                    return
                self._append(json.dumps(line) + "\n")
            except OSError:
                log.exception("could not write to the feedback log %s", self.log_path)
            finally:
                self._queue.task_done()

    def _append(self, text: str) -> None:
        path = self.log_path
        path.parent.mkdir(parents=True, exist_ok=True)
        size = path.stat().st_size if path.exists() else 0
        if size and size + len(text) > self.max_bytes:
            for i in range(self.keep, 0, -1):  # log.N is dropped, log.i -> log.i+1
                older = path.with_name(f"{path.name}.{i}")
                if i == self.keep:
                    older.unlink(missing_ok=True)
                else:
                    newer = path.with_name(f"{path.name}.{i + 1}")
                    if older.exists():
                        os.replace(older, newer)
            os.replace(path, path.with_name(f"{path.name}.1"))
        with path.open("a") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def read_feedback(path: Path, experiment: str | None = None) -> list[dict[str, object]]:
    """The feedback log's records, its rotated files first (of one experiment when
    given); torn lines skipped."""
    rotated = sorted(
        (p for p in path.parent.glob(f"{path.name}.*") if p.suffix[1:].isdigit()),
        key=lambda p: -int(p.suffix[1:]),
    )
    lines = [line for p in [*rotated, path] if p.is_file() for line in p.read_text().splitlines()]
    out = []
    for line in lines:
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict) and (experiment is None or r.get("experiment") == experiment):
            out.append(r)
    return out
