"""Optional integrations with Django and Celery; each module imports its framework, the core
never does."""
