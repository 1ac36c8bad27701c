# Production image: gunicorn with aiohttp's worker; needs STREAMER_REDIS_URL and
# STREAMER_SECRET (see README). Build: docker build -t streamer .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app

COPY setup.py pyproject.toml README.md ./
COPY streamer ./streamer
COPY deploy ./deploy
RUN pip install . && useradd --system --uid 10001 streamer

USER streamer
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status != 200)"
CMD ["gunicorn", "streamer.app:create_app", "-c", "deploy/gunicorn.conf.py", "--bind", "0.0.0.0:8080"]
