"""Django admin for nodes, slots, the audit log and API tokens. Writes go through
`slots.actions` (and `slots.tokens`) so the admin records events and pushes live updates
like every other entry point."""

from django import forms
from django.contrib import admin, messages
from django.utils import timezone
from django.utils.html import format_html

from . import tokens
from .actions import config, lifecycle
from .actions.errors import SlotError
from .forms import NodeForm, QueueTimeoutOptional
from .models import ApiToken, Node, Slot, SlotEvent


@admin.register(Node)
class NodeAdmin(admin.ModelAdmin):
    form = NodeForm
    list_display = ("name", "base_url", "enabled", "reachable", "version", "simulated",
                    "last_seen")
    list_filter = ("enabled", "reachable", "simulated")
    search_fields = ("name", "base_url")
    readonly_fields = ("reachable", "last_seen", "unreachable_since", "last_error", "version",
                       "simulated", "max_loaded_models")

    def save_model(self, request, obj, form, change):
        if change:
            config.do_update_node(obj, actor=request.user)
        else:
            config.do_create_node(obj, actor=request.user)

    def delete_model(self, request, obj):
        try:
            config.do_delete_node(obj, actor=request.user)
        except SlotError as exc:
            messages.error(request, exc.message)

    def delete_queryset(self, request, queryset):
        for node in queryset:
            self.delete_model(request, node)


STATE_COLOURS = {
    "ready": "#1a7f37", "serving": "#0969da", "loading": "#9a6700", "pulling": "#9a6700",
    "unloading": "#9a6700", "error": "#cf222e", "offline": "#57606a",
}


@admin.register(Slot)
class SlotAdmin(admin.ModelAdmin):
    form = QueueTimeoutOptional
    list_display = ("name", "capability", "device", "model_name", "state_badge", "node",
                    "is_default", "pinned", "keep_loaded", "enabled")
    list_filter = ("capability", "device", "state", "node", "enabled", "pinned")
    search_fields = ("name", "model_name", "loaded_model")
    fields = ("name", "capability", "device", "model_name", "ctx_size", "extra_args", "node",
              "pinned", "keep_loaded", "idle_timeout_s", "enabled", "is_default",
              "max_concurrency", "queue_timeout_s")
    readonly_fields = ()
    actions = ["load_selected", "unload_selected"]

    @admin.display(description="state", ordering="state")
    def state_badge(self, slot):
        return format_html('<b style="color:{}">{}</b>', STATE_COLOURS.get(slot.state, "#000"),
                           slot.state)

    def get_readonly_fields(self, request, obj=None):
        return ("name",) if obj and obj.seeded else ()

    def has_delete_permission(self, request, obj=None):
        if obj is not None and obj.seeded:
            return False
        return super().has_delete_permission(request, obj)

    def save_model(self, request, obj, form, change):
        data = {f: form.cleaned_data[f] for f in form.changed_data if f in self.fields}
        try:
            if change:
                # obj carries the form's values already; update_slot diffs against the row
                saved = config.do_update_slot(obj, data, actor=request.user)
            else:
                saved = config.do_create_slot(
                    {f: form.cleaned_data[f] for f in self.fields}, actor=request.user)
        except SlotError as exc:
            messages.error(request, exc.message)
            return
        obj.pk = saved.pk

    def delete_model(self, request, obj):
        try:
            config.do_delete_slot(obj, actor=request.user)
        except SlotError as exc:
            messages.error(request, exc.message)

    def delete_queryset(self, request, queryset):
        for slot in queryset:
            self.delete_model(request, slot)

    def _run(self, request, queryset, action):
        for slot in queryset:
            try:
                action(slot, actor=request.user)
                messages.success(request, f"{slot.name}: ok")
            except SlotError as exc:
                messages.error(request, f"{slot.name}: {exc.message}")

    @admin.action(description="Load selected slots")
    def load_selected(self, request, queryset):
        self._run(request, queryset, lifecycle.do_load_slot)

    @admin.action(description="Unload selected slots")
    def unload_selected(self, request, queryset):
        self._run(request, queryset, lifecycle.do_unload_slot)


@admin.register(SlotEvent)
class SlotEventAdmin(admin.ModelAdmin):
    list_display = ("created_at", "slot_name", "action", "actor", "from_state", "to_state",
                    "model", "duration_ms", "ok", "error_code")
    list_filter = ("action", "ok", "actor")
    search_fields = ("slot_name", "message", "model")
    date_hierarchy = "created_at"

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


# --- API tokens (gateway) ---------------------------------------------------------------------

class ApiTokenForm(forms.ModelForm):
    class Meta:
        model = ApiToken
        fields = ["name", "slots", "listed", "may_manage", "rpm_limit", "tpm_limit",
                  "expires_at"]

    def clean_slots(self):
        value = tokens.parse_slots(self.cleaned_data.get("slots", ""))
        if value:
            known = set(Slot.objects.values_list("name", flat=True))
            unknown = [s for s in value.split(",") if s not in known]
            if unknown:
                raise forms.ValidationError(f"No slot named {', '.join(unknown)}.")
        return value


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    """Adding a token generates it and shows it once; only its hash is stored."""

    form = ApiTokenForm
    list_display = ("name", "prefix", "slots", "listed", "may_manage", "rpm_limit",
                    "tpm_limit", "status", "expires_at", "last_used_at", "created_at",
                    "created_by")
    list_filter = ("may_manage",)
    search_fields = ("name", "prefix")
    readonly_fields = ("prefix", "created_at", "last_used_at", "revoked_at", "created_by")
    actions = ["revoke_selected"]

    def get_fields(self, request, obj=None):
        if obj is None:
            return ["name", "slots", "listed", "may_manage", "rpm_limit", "tpm_limit",
                    "expires_at"]
        return ["name", "prefix", "slots", "listed", "may_manage", "rpm_limit", "tpm_limit",
                "expires_at", "created_at", "created_by", "last_used_at", "revoked_at"]

    @admin.display(description="status")
    def status(self, token):
        if token.revoked_at:
            return "revoked"
        if token.expires_at and token.expires_at <= timezone.now():
            return "expired"
        return "active"

    def save_model(self, request, obj, form, change):
        if not change:
            row, raw = tokens.create_token(obj.name, slots=obj.slots, listed=obj.listed,
                                           may_manage=obj.may_manage,
                                           rpm_limit=obj.rpm_limit, tpm_limit=obj.tpm_limit,
                                           expires_at=obj.expires_at,
                                           created_by=request.user.get_username())
            obj.pk = row.pk
            obj.refresh_from_db()
            messages.warning(request, format_html(
                "API token <b>{}</b>: <code>{}</code> — copy it now, it is not shown again.",
                obj.name, raw))
            return
        super().save_model(request, obj, form, change)
        tokens.clear_cache()

    def delete_model(self, request, obj):
        super().delete_model(request, obj)
        tokens.clear_cache()

    def delete_queryset(self, request, queryset):
        super().delete_queryset(request, queryset)
        tokens.clear_cache()

    @admin.action(description="Revoke selected tokens")
    def revoke_selected(self, request, queryset):
        count = queryset.filter(revoked_at__isnull=True).update(revoked_at=timezone.now())
        tokens.clear_cache()
        messages.success(request, f"Revoked {count} token(s).")
