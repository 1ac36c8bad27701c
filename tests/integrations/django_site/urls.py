from django.urls import path

from streamer.integrations.django import streamer_auth_view, streamer_token_view

urlpatterns = [
    path("streamer/auth/", streamer_auth_view),  # STREAMER_AUTH_URL points here
    path("streamer/token/", streamer_token_view),
]
