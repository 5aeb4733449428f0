"""hal0's URL map: the dashboard and slot pages, the JSON API, the admin, accounts."""

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

# Only the account pages that work without email: a forgotten password is reset by an
# admin (/admin/ or `manage.py changepassword NAME`), not through a public reset form.
accounts = [
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("password_change/", auth_views.PasswordChangeView.as_view(), name="password_change"),
    path("password_change/done/", auth_views.PasswordChangeDoneView.as_view(),
         name="password_change_done"),
]

urlpatterns = [
    path("admin/", admin.site.urls),
    path("accounts/", include(accounts)),
    path("", include("slots.gateway.views")),  # /v1/ (OpenAI gateway), /metrics
    path("", include("slots.urls")),
]
