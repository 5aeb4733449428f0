"""hal0's URL map: the dashboard and slot pages, the JSON API, the admin, accounts."""

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.shortcuts import redirect
from django.templatetags.static import static
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

handler404 = "hal0site.errors.page_not_found"
handler500 = "hal0site.errors.server_error"

urlpatterns = [
    # browsers ask for /favicon.ico on pages that link none (the admin's); resolved per
    # request: production's hashed name exists only after collectstatic
    path("favicon.ico", lambda request: redirect(static("favicon.svg"), permanent=True),
         name="favicon"),
    path("admin/", admin.site.urls),
    path("accounts/", include(accounts)),
    path("", include("slots.gateway.views")),  # /v1/ (OpenAI gateway), /metrics
    path("", include("slots.urls")),
]
