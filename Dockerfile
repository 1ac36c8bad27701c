# Production image: gunicorn with streamer's uvloop worker (deploy/gunicorn.conf.py);
# needs STREAMER_REDIS_URL and STREAMER_SECRET (see README). Runs as an unprivileged
# user; /metrics keeps the workers' values in a directory under /tmp.
# Build: docker build -t streamer .   (linted by tests/test_deploy.py with hadolint)
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

COPY setup.py pyproject.toml README.md ./
COPY streamer ./streamer
COPY deploy ./deploy
RUN pip install . \
    && groupadd --system --gid 10001 streamer \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin streamer

USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status != 200)"]
# The command tests/test_deploy.py runs (as an unprivileged user); workers: WEB_CONCURRENCY.
CMD ["gunicorn", "streamer.app:create_app", "-c", "deploy/gunicorn.conf.py", "--bind", "0.0.0.0:8080"]
