"""Django admin for nodes, slots and the audit log. Writes go through slots.services so the
admin records events and pushes live updates like every other entry point."""

from django import forms
from django.contrib import admin, messages
from django.utils.html import format_html

from . import services
from .models import Node, Slot, SlotEvent
from .services import SlotError


class NodeForm(forms.ModelForm):
    """Keys are write-only: never rendered back; leaving a field empty keeps the old key."""

    base_url = forms.URLField(label="Base URL", assume_scheme="http",
                              help_text="e.g. http://127.0.0.1:13305")
    api_key = forms.CharField(required=False, widget=forms.PasswordInput(render_value=False),
                              help_text="Leave empty to keep the current key (dropped if the URL changes).")
    admin_api_key = forms.CharField(required=False,
                                    widget=forms.PasswordInput(render_value=False),
                                    help_text="Leave empty to keep the current key "
                                              "(dropped if the URL changes).")
    clear_keys = forms.BooleanField(required=False, help_text="Remove both stored keys.")

    class Meta:
        model = Node
        fields = ["name", "base_url", "api_key", "admin_api_key", "enabled"]

    def clean(self):
        data = super().clean()
        # Stored keys stay with the URL they were given for: pointing a node elsewhere
        # without retyping them drops them, so nobody can redirect the keys to their own host.
        moved = self.instance.pk and data.get("base_url") not in (None, self.instance.base_url)
        for key in ("api_key", "admin_api_key"):
            if data.get("clear_keys") or (moved and not data.get(key)):
                data[key] = ""
            elif not data.get(key) and self.instance.pk:
                data[key] = getattr(self.instance, key)
        return data


@admin.register(Node)
class NodeAdmin(admin.ModelAdmin):
    form = NodeForm
    list_display = ("name", "base_url", "enabled", "reachable", "version", "simulated",
                    "last_seen")
    list_filter = ("enabled", "reachable", "simulated")
    search_fields = ("name", "base_url")
    readonly_fields = ("reachable", "last_seen", "unreachable_since", "last_error", "version",
                       "simulated", "max_loaded_models")


STATE_COLOURS = {
    "ready": "#1a7f37", "serving": "#0969da", "loading": "#9a6700", "pulling": "#9a6700",
    "unloading": "#9a6700", "error": "#cf222e", "offline": "#57606a",
}


@admin.register(Slot)
class SlotAdmin(admin.ModelAdmin):
    list_display = ("name", "capability", "device", "model_name", "state_badge", "node",
                    "is_default", "pinned", "keep_loaded", "enabled")
    list_filter = ("capability", "device", "state", "node", "enabled", "pinned")
    search_fields = ("name", "model_name", "loaded_model")
    fields = ("name", "capability", "device", "model_name", "ctx_size", "extra_args", "node",
              "pinned", "keep_loaded", "idle_timeout_s", "enabled", "is_default")
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
                saved = services.update_slot(obj, data, actor=request.user)
            else:
                saved = services.create_slot(
                    {f: form.cleaned_data[f] for f in self.fields}, actor=request.user)
        except SlotError as exc:
            messages.error(request, exc.message)
            return
        obj.pk = saved.pk

    def delete_model(self, request, obj):
        try:
            services.delete_slot(obj, actor=request.user)
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
        self._run(request, queryset, services.load_slot)

    @admin.action(description="Unload selected slots")
    def unload_selected(self, request, queryset):
        self._run(request, queryset, services.unload_slot)


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

from .models import ApiToken  # noqa: E402
from .tokens import PREFIX, clear_cache, generate, hash_token, parse_slots  # noqa: E402


class ApiTokenForm(forms.ModelForm):
    class Meta:
        model = ApiToken
        fields = ["name", "slots", "listed", "expires_at"]

    def clean_slots(self):
        value = parse_slots(self.cleaned_data.get("slots", ""))
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
    list_display = ("name", "prefix", "slots", "listed", "status", "expires_at", "last_used_at",
                    "created_at", "created_by")
    search_fields = ("name", "prefix")
    readonly_fields = ("prefix", "created_at", "last_used_at", "revoked_at", "created_by")
    actions = ["revoke_selected"]

    def get_fields(self, request, obj=None):
        if obj is None:
            return ["name", "slots", "listed", "expires_at"]
        return ["name", "prefix", "slots", "listed", "expires_at", "created_at", "created_by",
                "last_used_at", "revoked_at"]

    @admin.display(description="status")
    def status(self, token):
        from django.utils import timezone

        if token.revoked_at:
            return "revoked"
        if token.expires_at and token.expires_at <= timezone.now():
            return "expired"
        return "active"

    def save_model(self, request, obj, form, change):
        if not change:
            raw = generate()
            obj.key_hash = hash_token(raw)
            obj.prefix = raw[: len(PREFIX) + 6]
            obj.created_by = request.user.get_username()
            super().save_model(request, obj, form, change)
            messages.warning(request, format_html(
                "API token <b>{}</b>: <code>{}</code> — copy it now, it is not shown again.",
                obj.name, raw))
            return
        super().save_model(request, obj, form, change)
        clear_cache()

    def delete_model(self, request, obj):
        super().delete_model(request, obj)
        clear_cache()

    def delete_queryset(self, request, queryset):
        super().delete_queryset(request, queryset)
        clear_cache()

    @admin.action(description="Revoke selected tokens")
    def revoke_selected(self, request, queryset):
        from django.utils import timezone

        count = queryset.filter(revoked_at__isnull=True).update(revoked_at=timezone.now())
        clear_cache()
        messages.success(request, f"Revoked {count} token(s).")
