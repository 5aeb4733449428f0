"""Websocket routes (wrapped in auth and an Origin check by `hal0site.asgi`)."""

from django.urls import path

from . import consumers

websocket_urlpatterns = [
    path("ws/slots/", consumers.DashboardConsumer.as_asgi()),
    path("ws/logs/", consumers.LogsConsumer.as_asgi()),
    path("ws/activity/", consumers.ActivityConsumer.as_asgi()),
]
