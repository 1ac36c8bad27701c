"""Tests of the integrations with Django and Celery, against real processes."""
