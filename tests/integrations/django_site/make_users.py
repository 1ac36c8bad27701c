"""Creates the test's users, their REST framework tokens and a logged-in session for
each; prints them as JSON: {username: {"id", "token", "sessionid"}}."""

import json
import os

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.integrations.django_site.settings")
django.setup()

from django.conf import settings  # noqa: E402
from django.contrib.auth.models import User  # noqa: E402
from django.test import Client  # noqa: E402
from rest_framework.authtoken.models import Token  # noqa: E402

users = {}
for name in ("alice", "bob", "mallory"):
    user = User.objects.create_user(name, password="not-used")
    client = Client()
    client.force_login(user)
    users[name] = {
        "id": str(user.pk),
        "token": Token.objects.create(user=user).key,
        "sessionid": client.cookies[settings.SESSION_COOKIE_NAME].value,
    }
mallory = User.objects.get(username="mallory")
mallory.is_active = False  # a deactivated account: its token and session must not stream
mallory.save()
print(json.dumps(users))
