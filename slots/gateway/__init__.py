"""The OpenAI-compatible gateway (`/v1/...`) and `/metrics`:

* `endpoints` — the one table of endpoints, from which both the URL patterns and the fast
  path are generated;
* `routes` — which slot a request goes to (the cached routing table);
* `catalog` — what the gateway tells clients about itself (model entries, voices);
* `proxy` — auth, on-demand loads, forwarding to lemond, streaming, metrics;
* `limits` — per-token rate limits and per-slot queues as OpenAI-shaped 429s and headers;
* `views` — the Django views and `urlpatterns`;
* `asgi` — the fast path that serves the gateway's paths next to Django's handler.
"""
