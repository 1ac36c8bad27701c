"""Settings of the test app. The database and secrets come from the test's environment."""

import os

import django

SECRET_KEY = os.environ["DJANGO_SECRET_KEY"]
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "rest_framework",
    "rest_framework.authtoken",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
]
if django.VERSION >= (5, 1):
    # Sites that require a login everywhere: streamer's views must still answer.
    MIDDLEWARE.append("django.contrib.auth.middleware.LoginRequiredMiddleware")
    LOGIN_URL = "/login/"
# Inactive users' sessions authenticate too (as on sites that show them a "deactivated"
# page): streamer's views must refuse them themselves.
AUTHENTICATION_BACKENDS = ["django.contrib.auth.backends.AllowAllUsersModelBackend"]
ROOT_URLCONF = "tests.integrations.django_site.urls"
DATABASES = {
    "default": {"ENGINE": "django.db.backends.sqlite3", "NAME": os.environ["DJANGO_DB_PATH"]}
}
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
# The streamer service's secret: the token view signs with it.
STREAMER_SECRET = os.environ["STREAMER_SECRET"]
