"""URLs of the OpenAI-compatible gateway (`/v1/...`) and Prometheus `/metrics`.

`slots.gateway_asgi` serves the same paths on its fast path (from `gateway_asgi.views()`),
and answers every other path under /v1/ and /models itself (`gateway.not_served`), so
Django never sees them."""

from django.urls import path

from . import gateway

urlpatterns = [
    path("v1/models", gateway.models, name="gateway-models"),
    path("v1/models/<path:model_id>", gateway.models, name="gateway-model"),
    path("v1/audio/voices", gateway.audio_voices, name="gateway-audio-voices"),
    path("v1/audio/models", gateway.audio_models, name="gateway-audio-models"),
    *[path(f"v1/{endpoint}", gateway.gateway_view(endpoint),
           name=f"gateway-{endpoint.replace('/', '-')}")
      for endpoint in gateway.ENDPOINTS],
    path("metrics", gateway.prometheus, name="metrics"),
]
