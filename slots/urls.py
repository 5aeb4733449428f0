from django.urls import path

from . import api, trying, views

app_name = "slots"

urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("new-slot/", views.slot_create, name="create"),
    path("logs/", views.logs, name="logs"),
    path("nodes/", views.nodes, name="nodes"),
    path("nodes/<slug:name>/", views.node_edit, name="node"),
    path("nodes/<slug:name>/delete/", views.node_delete, name="node-delete"),
    path("tokens/", views.token_list, name="tokens"),
    path("tokens/<slug:name>/revoke/", views.token_revoke, name="token-revoke"),
    path("catalogue/", views.model_pick, name="model-pick"),
    path("slots/<str:name>/", views.slot_detail, name="detail"),
    path("slots/<str:name>/delete/", views.slot_delete, name="delete"),
    path("slots/<str:name>/do/<str:action>/", views.slot_action, name="action"),
    path("slots/<str:name>/models/", views.swap_picker, name="swap-picker"),
    path("slots/<str:name>/pull/", views.pull_start, name="pull"),
    path("slots/<str:name>/pull/cancel/", views.pull_cancel, name="pull-cancel"),
    path("slots/<str:name>/lemond/", views.lemond_model, name="lemond-model"),
    path("slots/<str:name>/try/<path:endpoint>", trying.try_endpoint, name="try"),  # type: ignore[arg-type]  # an async view
    path("activity/", views.activity_page, name="activity"),
    path("api/health", api.health, name="api-health"),
    path("api/slots/", api.slot_list, name="api-list"),
    path("api/slots/<str:name>/", api.slot_detail, name="api-detail"),
    path("api/slots/<str:name>/<str:action>", api.slot_action, name="api-action"),
    # scripts write it with a trailing slash too
    path("api/slots/<str:name>/<str:action>/", api.slot_action, name="api-action-slash"),
]
