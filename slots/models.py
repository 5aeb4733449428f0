"""Slots own hal0's data: the desired state (`Slot`), the lemond nodes that serve it
(`Node`) and the audit log (`SlotEvent`).

Desired fields are written by the operator (forms, admin, API, CLI, import) through the
actions in `slots.actions`; observed fields are written only by those actions and the
reconciler, from what lemond reports. Validation lives in `clean()` so every entry point
shares it.
"""

from __future__ import annotations

import re
import shlex

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Q
from django.utils import timezone
from django.utils.functional import cached_property

from providers.lemonade import versions
from providers.lemonade.client import LemonadeClient, client_for
from providers.lemonade.errors import LemonadeError
from providers.lemonade.names import model_name_problem
from providers.lemonade.provider import recipe_for
from providers.lemonade.versions import parse_version  # noqa: F401 - imported from here

from . import states
from .states import State


class Capability(models.TextChoices):
    CHAT = "chat", "chat"
    EMBED = "embed", "embeddings"
    RERANK = "rerank", "reranking"
    STT = "stt", "speech-to-text"
    TTS = "tts", "text-to-speech"
    IMG = "img", "image generation"


class Device(models.TextChoices):
    GPU_ROCM = "gpu-rocm", "GPU (ROCm)"
    GPU_VULKAN = "gpu-vulkan", "GPU (Vulkan)"
    CPU = "cpu", "CPU"
    NPU = "npu", "NPU"


# capability -> lemond model type (lemond >= 10.5 names; `audio` before, see provider)
LEMOND_TYPE = {
    Capability.CHAT: "llm",
    Capability.EMBED: "embedding",
    Capability.RERANK: "reranking",
    Capability.STT: "transcription",
    Capability.TTS: "tts",
    Capability.IMG: "image",
}

# Which devices each capability's lemond recipe can run on (lemond-api.md §4.1):
# kokoro (tts) is CPU-only; sd-cpp (img) has no NPU backend.
SUPPORTED_DEVICES = {
    Capability.CHAT: set(Device.values),
    Capability.EMBED: set(Device.values),
    Capability.RERANK: {Device.GPU_ROCM, Device.GPU_VULKAN, Device.CPU},
    Capability.STT: set(Device.values),
    Capability.TTS: {Device.CPU},
    Capability.IMG: {Device.GPU_ROCM, Device.GPU_VULKAN, Device.CPU},
}

SLOT_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
CTX_MIN, CTX_MAX = 128, 1_048_576
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def validate_extra_args(value: str, *, recipe: str = "llamacpp", lemond_version: str = ""
                        ) -> None:
    """Reject what lemond would reject, naming the offending flag: the flags the node's
    lemond version sets itself for the slot's backend (`providers.lemonade.versions`; an
    unknown version is taken as the pinned one). lemond 10.6 does not refuse them up front:
    the backend fails to start and lemond evicts every loaded model."""
    if not value:
        return
    if _CONTROL_RE.search(value):
        raise ValidationError(
            "extra_args must be one line: newlines and control characters are not allowed.",
            code="control_chars",
        )
    try:
        shlex.split(value)
    except ValueError as exc:
        raise ValidationError(f"extra_args cannot be parsed: {exc}.", code="unparsable") from None
    problem = versions.for_version(lemond_version).backend_args_problem(recipe, value)
    if problem:
        raise ValidationError(problem, code="forbidden_flag")


def can_manage_slots(user) -> bool:
    """Roles: every logged-in operator may load, unload, restart, swap and pin slots and
    edit their model and limits; `extra_args` (passed to the backend's command line),
    moving a slot to another node, deleting slots and lemond's logs need staff or the
    permission `slots.manage_slots`."""
    return bool(user is not None and user.is_authenticated
                and (user.is_staff or user.has_perm("slots.manage_slots")))


class Node(models.Model):
    """A lemond endpoint. Keys are write-only: forms and pages never render them back."""

    name = models.SlugField(max_length=32, unique=True)
    base_url = models.URLField("base URL", max_length=200)
    api_key = models.CharField("API key", max_length=256, blank=True)
    admin_api_key = models.CharField("admin API key", max_length=256, blank=True)
    enabled = models.BooleanField(default=True)

    # observed (reconciler)
    reachable = models.BooleanField(default=False)
    last_seen = models.DateTimeField(null=True, blank=True)
    unreachable_since = models.DateTimeField(null=True, blank=True)
    last_error = models.CharField(max_length=500, blank=True)
    version = models.CharField("lemond version", max_length=40, blank=True)
    simulated = models.BooleanField(default=False)
    max_loaded_models = models.IntegerField(null=True, blank=True)
    system_stats = models.JSONField(default=dict, blank=True)
    request_stats = models.JSONField(default=dict, blank=True)
    # e.g. "3 keep-loaded llm slots but lemond keeps 1 llm model": shown, never looped on
    config_warning = models.CharField(max_length=500, blank=True)

    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        super().clean()
        # hal0 sends lemond's keys to this URL: only lemond's own schemes, nothing httpx or
        # a later client might resolve to a file, a socket or another protocol.
        scheme = self.base_url.split(":", 1)[0].lower() if ":" in (self.base_url or "") else ""
        if self.base_url and scheme not in ("http", "https"):
            raise ValidationError({"base_url": "A node's URL starts with http:// or https://."})

    LOCAL = "local"

    @classmethod
    def local(cls) -> Node:
        """The default node, created from HAL0_LEMONADE_URL on first use."""
        node, _ = cls.objects.get_or_create(
            name=cls.LOCAL,
            defaults={
                "base_url": settings.HAL0_LEMONADE_URL,
                "api_key": settings.HAL0_LEMONADE_API_KEY,
                "admin_api_key": settings.HAL0_LEMONADE_ADMIN_API_KEY,
            },
        )
        return node

    def client(self, timeout: float | None = None) -> LemonadeClient:
        """The client for this node's lemond (shared connections; `.sync` is its blocking
        twin); `timeout` for ordinary calls (default HAL0_LEMONADE_TIMEOUT), loads get
        HAL0_LEMONADE_LOAD_TIMEOUT. The one place slots/ gets a lemond client."""
        return client_for(self.base_url, api_key=self.api_key, admin_api_key=self.admin_api_key,
                          timeout=settings.HAL0_LEMONADE_TIMEOUT if timeout is None
                          else timeout,
                          load_timeout=settings.HAL0_LEMONADE_LOAD_TIMEOUT)

    @property
    def lemond(self) -> versions.Capabilities:
        """What this node's lemond can do, by the version it last reported."""
        return versions.for_version(self.version)

    @property
    def supports_pinning(self) -> bool:
        """lemond only knows pins from v10.8; below, hal0 protects pinned slots itself."""
        return self.lemond.pins

    @property
    def transcription_type(self) -> str:
        return self.lemond.transcription_type

    def check_connection(self) -> tuple[bool, str]:
        """Ask this node's lemond for its health now, within a page's patience: (answered,
        what it said). The Nodes page tests a node when it is saved."""
        try:
            health = self.client(settings.HAL0_PAGE_LEMOND_TIMEOUT_S).sync.health()
        except LemonadeError as exc:
            return False, str(exc) or type(exc).__name__
        return True, f"lemond {health.version or '(no version)'}" + (
            ", a simulator" if health.simulated else "")

    @property
    def last_request(self) -> dict | None:
        """lemond's figures for its last request, TTFT in ms; None before any request (lemond
        reports zeros then, which a page must not show as "0 tok/s")."""
        stats = self.request_stats or {}
        tps, ttft = stats.get("tokens_per_second"), stats.get("time_to_first_token")
        if stats.get("request_count_total") == 0 or not (tps or ttft):
            return None
        return {"tokens_per_s": tps, "ttft_ms": round(ttft * 1000) if ttft else None}

    @cached_property
    def has_slots(self) -> bool:
        """Pages that list the slots anyway set this from their list (no query per node)."""
        return self.slots.exists()

    @property
    def dead(self) -> bool:
        """Unreachable (or disabled) and serving nothing: the dashboard folds it to one line."""
        down = not self.enabled or (not self.reachable and self.unreachable_since is not None)
        return down and not self.has_slots

    def health_rank(self) -> int:
        """Working nodes first, then those with slots to show, then dead empty ones."""
        if self.enabled and self.reachable:
            return 0
        return 2 if self.dead else 1


class SlotQuerySet(models.QuerySet):
    def enabled(self):
        return self.filter(enabled=True)

    def for_dashboard(self):
        return self.select_related("node").order_by("capability", "name")


class Slot(models.Model):
    """One thing the appliance serves: desired config plus what lemond was last seen doing."""

    name = models.CharField(max_length=32, unique=True)
    capability = models.CharField(max_length=8, choices=Capability.choices)
    device = models.CharField(max_length=12, choices=Device.choices)
    model_name = models.CharField("model", max_length=200)
    ctx_size = models.PositiveIntegerField(
        "context size", null=True, blank=True, help_text="Empty = lemond's default."
    )
    extra_args = models.CharField(
        "extra args", max_length=1000, blank=True,
        help_text="Sent to lemond as the backend's args (llamacpp_args for llama.cpp).",
    )
    pinned = models.BooleanField(default=False, help_text="Never evicted by lemond's LRU.")
    keep_loaded = models.BooleanField(
        default=False, help_text="Reloaded by hal0 whenever lemond drops it."
    )
    idle_timeout_s = models.PositiveIntegerField(
        "idle timeout (s)", default=300, help_text="Unload after this long unused; 0 = never."
    )
    enabled = models.BooleanField(default=True)
    # gateway admission: beyond max_concurrency, requests wait in a queue fair across tokens
    max_concurrency = models.PositiveIntegerField(
        "max concurrency", null=True, blank=True,
        help_text="Requests served at once; more wait in a fair queue. Empty = unlimited.")
    queue_timeout_s = models.PositiveIntegerField(
        "queue timeout (s)", default=30,
        help_text="A queued request waiting longer gets 429 with Retry-After.")
    is_default = models.BooleanField(
        "default for its capability", default=False,
        help_text="Requests naming the capability (e.g. 'embed') go to this slot.",
    )
    seeded = models.BooleanField(default=False, editable=False)
    node = models.ForeignKey(Node, on_delete=models.PROTECT, related_name="slots")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    # observed: written only by slots.actions and slots.reconciler
    state = models.CharField(max_length=10, choices=State.choices, default=State.OFFLINE)
    loaded_model = models.CharField(max_length=200, blank=True)
    last_use_at = models.DateTimeField(null=True, blank=True)
    state_message = models.CharField(max_length=1000, blank=True)
    error_code = models.CharField(max_length=40, blank=True)
    state_changed_at = models.DateTimeField(default=timezone.now)
    last_load_ms = models.PositiveIntegerField(null=True, blank=True)
    lemond_entry = models.JSONField(default=dict, blank=True)
    # the /v1/load body of the load that made the slot ready ({} when hal0 did not load it
    # itself): a load with the same body while the slot is loaded is a no-op
    loaded_options = models.JSONField(default=dict, blank=True)

    objects = SlotQuerySet.as_manager()

    DESIRED_FIELDS = (
        "name", "capability", "device", "model_name", "ctx_size", "extra_args", "pinned",
        "keep_loaded", "idle_timeout_s", "enabled", "is_default", "max_concurrency",
        "queue_timeout_s",
    )

    class Meta:
        ordering = ["capability", "name"]
        # Staff have it implicitly; give it to an operator who should set extra_args, move
        # slots between nodes, delete slots and read lemond's logs (docs/security.md).
        permissions = [("manage_slots", "Can set extra args, move and delete slots, "
                                        "read lemond logs")]
        constraints = [
            models.UniqueConstraint(
                fields=["capability"], condition=Q(is_default=True),
                name="one_default_slot_per_capability",
                violation_error_message="Another slot is already the default for this capability.",
            ),
        ]

    def __str__(self) -> str:
        return self.name

    # --- validation ---------------------------------------------------------------
    def clean(self) -> None:
        errors = self.config_errors()
        if self.is_default and self.capability:
            clash = Slot.objects.filter(capability=self.capability, is_default=True)
            if self.pk:
                clash = clash.exclude(pk=self.pk)
            other = clash.values_list("name", flat=True).first()
            if other:
                errors.setdefault("is_default", []).append(
                    f"Slot {other!r} is already the default {self.capability} slot.")
        if errors:
            raise ValidationError(errors)

    def config_errors(self) -> dict[str, list[str]]:
        """Every rule that needs only this slot (clean() adds the one-default rule)."""
        rules = {"name": self._name_problems, "capability": self._capability_problems,
                 "device": self._device_problems, "model_name": self._model_problems,
                 "ctx_size": self._ctx_problems, "extra_args": self._args_problems,
                 "max_concurrency": self._concurrency_problems,
                 "queue_timeout_s": self._queue_timeout_problems}
        return {field: problems for field, rule in rules.items() if (problems := rule())}

    def _name_problems(self) -> list[str]:
        if SLOT_NAME_RE.match(self.name or ""):
            return []
        return ["Slot names are 1-32 characters: lowercase letters, digits, '-' and '_', "
                "starting with a letter or digit."]

    def _capability_problems(self) -> list[str]:
        if self.capability in Capability.values:
            return []
        return [f"Unknown capability {self.capability!r}; choose one of "
                f"{', '.join(Capability.values)}."]

    def _device_problems(self) -> list[str]:
        if self.device not in Device.values:
            return [f"Unknown device {self.device!r}; choose one of {', '.join(Device.values)}."]
        if self.capability in Capability.values and \
                self.device not in SUPPORTED_DEVICES[self.capability]:
            allowed = ", ".join(d for d in Device.values if d in SUPPORTED_DEVICES[self.capability])
            return [f"A {self.capability} slot cannot run on {self.device}; supported: {allowed}."]
        return []

    def _model_problems(self) -> list[str]:
        if not (self.model_name or "").strip():
            return ["A slot needs a model."]
        if _CONTROL_RE.search(self.model_name) or " " in self.model_name.strip():
            return ["Model names cannot contain spaces or control characters."]
        problem = model_name_problem(self.model_name)  # the client's rule (#14): one segment
        return [problem] if problem else []

    def _ctx_problems(self) -> list[str]:
        if self.ctx_size is None:
            return []
        if not (CTX_MIN <= self.ctx_size <= CTX_MAX):
            return [f"Context size must be between {CTX_MIN} and {CTX_MAX:,} (or empty for "
                    "lemond's default)."]
        # only llama.cpp and FastFlowLM take a context size; kokoro takes no args at all
        if self.capability in ("chat", "embed", "rerank") or self.device == "npu":
            return []
        return [f"A {self.capability} slot has no context size; leave it empty."]

    def _concurrency_problems(self) -> list[str]:
        if self.max_concurrency is None or 1 <= self.max_concurrency <= 10_000:
            return []
        return ["Max concurrency is 1 to 10000 (empty = unlimited)."]

    def _queue_timeout_problems(self) -> list[str]:
        if self.queue_timeout_s is None or 0 <= self.queue_timeout_s <= 3600:
            return []
        return ["The queue timeout is 0 to 3600 seconds (0 = never wait)."]

    def _args_problems(self) -> list[str]:
        problems = []
        if self.capability == Capability.TTS and (self.extra_args or "").strip():
            problems.append("Text-to-speech (kokoro) takes no extra args; leave it empty.")
        if self.capability in Capability.values and self.device in Device.values:
            try:
                validate_extra_args(
                    self.extra_args or "", recipe=recipe_for(self.capability, self.device),
                    lemond_version=self.node.version if self.node_id else "")
            except ValidationError as exc:
                problems.extend(exc.messages)
        return problems

    # --- what lemond sees ----------------------------------------------------------
    @property
    def lemond_type(self) -> str:
        kind = LEMOND_TYPE[Capability(self.capability)]
        if kind == "transcription" and self.node_id:
            return self.node.transcription_type
        return kind

    @property
    def drift(self) -> str:
        """A sentence when lemond serves something other than what the slot asks for."""
        if self.loaded_model and self.loaded_model != self.model_name:
            return f"lemond has {self.loaded_model} loaded, the slot wants {self.model_name}"
        return ""

    @staticmethod
    def can(action: str, state: str) -> bool:
        return states.can(action, state)

    @property
    def actions(self) -> dict[str, bool]:
        """For templates: which buttons are enabled now."""
        enabled = {a: self.enabled and states.can(a, self.state) for a in states.LEGAL_FROM}
        enabled["unload"] = states.can("unload", self.state)
        return enabled

    @property
    def is_loaded(self) -> bool:
        return states.is_loaded(self.state)

    def as_json(self) -> dict:
        """Desired plus observed state, for the JSON API and `slots … --json`."""
        return {
            **self.export_dict(),
            "state": self.state,
            "loaded_model": self.loaded_model,
            "error_code": self.error_code,
            "state_message": self.state_message,
            "state_changed_at": self.state_changed_at.isoformat(),
            "last_use_at": self.last_use_at.isoformat() if self.last_use_at else None,
            "last_load_ms": self.last_load_ms,
            "seeded": self.seeded,
            "drift": self.drift or None,
            "simulated": self.node.simulated,
        }

    def export_dict(self) -> dict:
        """The desired state only: what `slots export` writes and `slots import` reads."""
        data = {field: getattr(self, field) for field in self.DESIRED_FIELDS}
        data["node"] = self.node.name
        return data


class EventActor:
    RECONCILER = "reconciler"
    GATEWAY = "gateway"
    CLI = "cli"
    API = "api"
    ADMIN = "admin"


class SlotEvent(models.Model):
    """The audit log: one row per action or observed change, never edited."""

    ACTIONS = (
        "create", "update", "delete", "load", "unload", "restart", "swap", "pin", "unpin",
        "evicted", "adopted", "restored", "idle-unload", "error", "pull",
        # a busy state whose owning process died before it finished (settled from lemond)
        "interrupted",
        # a node's changes, recorded under its name with no slot
        "node-create", "node-update", "node-delete",
    )

    slot = models.ForeignKey(
        Slot, null=True, blank=True, on_delete=models.SET_NULL, related_name="events"
    )
    # kept so the history stays readable after a slot is deleted
    slot_name = models.CharField(max_length=32)
    action = models.CharField(max_length=16, choices=[(a, a) for a in ACTIONS])
    actor = models.CharField(max_length=150, default=EventActor.CLI)
    from_state = models.CharField(max_length=10, blank=True)
    to_state = models.CharField(max_length=10, blank=True)
    model = models.CharField(max_length=200, blank=True)
    duration_ms = models.PositiveIntegerField(null=True, blank=True)
    ok = models.BooleanField(default=True)
    error_code = models.CharField(max_length=40, blank=True)
    message = models.CharField(max_length=1000, blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["slot", "-created_at"], name="slotevent_slot_newest")]

    def __str__(self) -> str:
        return f"{self.slot_name} {self.action} {'ok' if self.ok else 'failed'}"

    @property
    def cancelled(self) -> bool:
        """Stopped on purpose (a download cancelled): not ok, but no failure either."""
        return not self.ok and self.error_code.endswith(".cancelled")


class ApiTokenQuerySet(models.QuerySet):
    def active(self):
        now = timezone.now()
        return self.filter(revoked_at__isnull=True).filter(
            Q(expires_at__isnull=True) | Q(expires_at__gt=now))


class ApiToken(models.Model):
    """A bearer token for the JSON API and the OpenAI gateway. Only a hash is stored; the
    token itself is shown once when created."""

    name = models.SlugField(max_length=64, unique=True)
    prefix = models.CharField(max_length=16, db_index=True,
                              help_text="The token's first characters, to tell tokens apart.")
    key_hash = models.CharField(max_length=128, unique=True)
    slots = models.CharField(max_length=500, blank=True,
                             help_text="Comma-separated slot names this token may use; "
                                       "empty = all.")
    # What a client's model picker shows is not what the client may use: Open WebUI offers
    # every listed model as a chat model, yet needs the same key for embeddings and audio.
    listed = models.CharField(
        max_length=500, blank=True,
        help_text="Comma-separated slot names or capabilities (chat, embed, …) that "
                  "GET /v1/models shows to this token; empty = every slot it may use. "
                  "The token may still use the other slots by name.")
    may_manage = models.BooleanField(
        "may load and unload", default=False,
        help_text="May load and unload its slots through POST /models/load and /models/unload.")
    rpm_limit = models.PositiveIntegerField(
        "requests per minute", null=True, blank=True, help_text="Empty = unlimited.")
    tpm_limit = models.PositiveIntegerField(
        "tokens per minute", null=True, blank=True,
        help_text="Input + output tokens, counted from usage. Empty = unlimited.")
    expires_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    created_by = models.CharField(max_length=150, blank=True)

    objects = ApiTokenQuerySet.as_manager()

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def allowed_slots(self) -> list[str]:
        return [s.strip() for s in self.slots.split(",") if s.strip()]

    def allows_slot(self, slot_name: str) -> bool:
        allowed = self.allowed_slots
        return not allowed or slot_name in allowed

    @property
    def listed_names(self) -> list[str]:
        return [s.strip() for s in self.listed.split(",") if s.strip()]

    def clean(self):
        errors: dict[str, str] = {}
        if unknown := unknown_slots_or_capabilities(self.listed_names):
            errors["listed"] = f"No slot or capability named {', '.join(map(repr, unknown))}."
        for field in ("rpm_limit", "tpm_limit"):
            # 0 would refuse every request: a token that may do nothing is a revoked one
            if getattr(self, field) == 0:
                errors[field] = "A limit is at least 1 (leave it empty for unlimited)."
        if errors:
            raise ValidationError(errors)


def unknown_slots_or_capabilities(names: list[str]) -> list[str]:
    """The names that are neither a slot's name nor a capability (for a token's `listed`)."""
    known = set(Capability.values) | set(
        Slot.objects.filter(name__in=names).values_list("name", flat=True))
    return [n for n in names if n not in known]


class RequestMetric(models.Model):
    """One gateway request, kept for a configurable window (see the gateway's pruning)."""

    slot_name = models.CharField(max_length=32)
    endpoint = models.CharField(max_length=40)
    status = models.PositiveSmallIntegerField()
    started_at = models.DateTimeField(db_index=True)
    latency_ms = models.FloatField()
    ttft_ms = models.FloatField(null=True, blank=True)
    tokens_in = models.PositiveIntegerField(null=True, blank=True)
    tokens_out = models.PositiveIntegerField(null=True, blank=True)
    tokens_per_s = models.FloatField(null=True, blank=True)
    stream = models.BooleanField(default=False)
    # the API token's name ("" for a staff session), for the Activity page
    token_name = models.CharField(max_length=64, blank=True)

    class Meta:
        ordering = ["-started_at"]
        indexes = [models.Index(fields=["slot_name", "-started_at"], name="metric_slot_newest")]

    def __str__(self) -> str:
        return f"{self.slot_name} {self.endpoint} {self.status} {self.latency_ms:.0f} ms"


class Lease(models.Model):
    """A named lease in the database, e.g. "reconciler:<node>": only its holder polls that
    node; another process takes over once it expires."""

    name = models.CharField(max_length=100, unique=True)
    holder = models.CharField(max_length=100)
    expires_at = models.DateTimeField()

    def __str__(self) -> str:
        return f"{self.name} held by {self.holder}"
