"""A minimal Django app with REST framework tokens and sessions, as the apps that move
from Channels to streamer have; the tests run it under gunicorn."""
