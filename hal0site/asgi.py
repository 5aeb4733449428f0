"""ASGI entry point: HTTP through Django, websockets through Channels.

Websockets go through the session auth stack and an Origin check as strict as CSRF's
(hal0site.security), so a page on another site cannot open a socket with the operator's
cookies.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "hal0site.settings")
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402  (needs Django set up first)
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from hal0site.security import WebsocketOriginValidator, gateway_headers  # noqa: E402
from slots.gateway import asgi as gateway_asgi  # noqa: E402
from slots.routing import websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter(
    {
        # /v1/... (the OpenAI gateway) is served beside Django's handler, not through it:
        # that saves a thread hop per request (docs/benchmarks.md); the rest is Django.
        "http": gateway_asgi.wrap(django_asgi_app, headers=gateway_headers),
        "websocket": WebsocketOriginValidator(
            AuthMiddlewareStack(URLRouter(websocket_urlpatterns))
        ),
    }
)
