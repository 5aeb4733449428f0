"""URLs of the OpenAI-compatible gateway (`/v1/...`) and Prometheus `/metrics`."""

from django.urls import path

from . import gateway

urlpatterns = [
    path("v1/models", gateway.models, name="gateway-models"),
    path("v1/models/<path:model_id>", gateway.models, name="gateway-model"),
    *[path(f"v1/{endpoint}", gateway.gateway_view(endpoint),
           name=f"gateway-{endpoint.replace('/', '-')}")
      for endpoint in gateway.ENDPOINTS],
    path("metrics", gateway.prometheus, name="metrics"),
]
