"""The deploy files: linted and validated against their schemas, and the command lines
they contain are the ones the tests run (the Dockerfile's is run, as an unprivileged
user)."""

from __future__ import annotations

import ast
import configparser
import json
import re
import shlex
import shutil
import ssl
import string
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from .certificates import self_signed_certificate
from .nginx import MAIN_CONF
from .processes import BIN, ServerProcess, free_port, gunicorn_args, terminate
from .waiting import eventually_sync

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
StartProcess = Callable[..., ServerProcess]
UNPRIVILEGED = "65534"  # nobody


def gunicorn_setting(name: str) -> Any:
    """A plain value assigned in deploy/gunicorn.conf.py (read, not run: running it
    makes a metrics directory)."""
    tree = ast.parse((DEPLOY / "gunicorn.conf.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == [
            name
        ]:
            return ast.literal_eval(node.value)
    raise AssertionError(f"deploy/gunicorn.conf.py sets no {name}")


def normalised(command: list[str]) -> list[str]:
    """A gunicorn command line without what differs between places (where it listens,
    how many workers, the path to the program and to the config)."""
    out: list[str] = []
    args = iter(command)
    for arg in args:
        if arg in ("--bind", "-b", "--workers", "-w"):
            next(args)
        elif arg == "-c":
            config = Path(next(args))
            out += ["-c", str(config.relative_to(ROOT) if config.is_absolute() else config)]
        elif not out:
            out.append(Path(arg).name)  # /opt/streamer/.venv/bin/gunicorn -> gunicorn
        else:
            out.append(arg)
    return out


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def dockerfile_cmd() -> list[str]:
    cmds = [rest for name, rest in dockerfile_instructions() if name == "CMD"]
    command: list[str] = json.loads(cmds[-1])
    return command


def kubernetes_documents() -> list[dict[str, Any]]:
    return [
        document
        for path in sorted((DEPLOY / "kubernetes").glob("*.yaml"))
        for document in yaml.safe_load_all(path.read_text())
    ]


def kubernetes_deployment() -> dict[str, Any]:
    (deployment,) = [d for d in kubernetes_documents() if d["kind"] == "Deployment"]
    return deployment


def systemd_unit() -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string((DEPLOY / "streamer.service").read_text())
    return unit


# --- the command lines -----------------------------------------------------------------


def test_every_deploy_file_runs_the_command_the_tests_run() -> None:
    tested = normalised(gunicorn_args(2))
    (container,) = kubernetes_deployment()["spec"]["template"]["spec"]["containers"]
    places = {
        "Dockerfile CMD": dockerfile_cmd(),
        "deploy/kubernetes Deployment": [*container.get("command", []), *container.get("args", [])],
        "deploy/streamer.service ExecStart": shlex.split(systemd_unit()["Service"]["ExecStart"]),
    }
    for place, command in places.items():
        assert normalised(command) == tested, place
    assert "deploy/gunicorn.conf.py" in (ROOT / "README.md").read_text()


def test_the_dockerfile_command_runs_as_an_unprivileged_user(
    redis_url: str, process_env: dict[str, str], start_process: StartProcess
) -> None:
    """What the image runs, as its user would: no home directory, nothing writable but
    /tmp. gunicorn's control socket would want $HOME/.gunicorn; the config leaves it off.
    (The user may read everything, CAP_DAC_READ_SEARCH: this machine's Python and the
    virtualenv may live under /root; writing anywhere but /tmp is still refused.)"""
    setpriv = shutil.which("setpriv")
    assert setpriv is not None, "setpriv (util-linux) is missing"
    command = [arg.replace("0.0.0.0:8080", "127.0.0.1:{port}") for arg in dockerfile_cmd()]
    command[0] = str(BIN / command[0])
    env = {
        **process_env,
        "STREAMER_REDIS_URL": redis_url,
        "WEB_CONCURRENCY": "2",
        "HOME": "/nonexistent",
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    server = start_process(
        [
            setpriv,
            f"--reuid={UNPRIVILEGED}",
            f"--regid={UNPRIVILEGED}",
            "--clear-groups",
            "--inh-caps=+dac_read_search",
            "--ambient-caps=+dac_read_search",
            *command,
        ],
        env,
        cwd=ROOT,  # the image's WORKDIR holds deploy/
    )
    server.wait_healthy()
    status, body = server.get("/metrics")
    assert status == 200 and b"streamer_connections" in body
    workers = Path(f"/proc/{server.process.pid}/status").read_text()
    assert re.search(rf"^Uid:\s+{UNPRIVILEGED}\b", workers, re.M), "not running unprivileged"
    log = server.log()
    for trouble in ("Traceback", "Permission denied", "control socket", "Error"):
        assert trouble not in log, log
    dockerfile = dockerfile_instructions()
    user = [rest for name, rest in dockerfile if name == "USER"][-1].split(":")[0]
    assert user not in ("0", "root")


# --- Dockerfile ------------------------------------------------------------------------


def test_the_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [str(BIN / "hadolint"), "--no-color", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


# --- docker compose --------------------------------------------------------------------


def compose_schema() -> dict[str, Any]:
    """The Compose specification's schema, as check-jsonschema ships it (vendored from
    the compose-spec repository)."""
    vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    schema: dict[str, Any] = json.loads(vendor.joinpath("compose-spec.json").read_text())
    return schema


def test_docker_compose_follows_the_compose_specification() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(compose)]
    assert errors == []
    broken = {**compose, "services": {**compose["services"], "redis": {"imagee": "redis"}}}
    assert not validator.is_valid(broken)  # the schema does look at the services

    services = compose["services"]
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert services["streamer"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["streamer"]["build"] == ".."  # the Dockerfile above, and its CMD
    for volume in services["nginx"]["volumes"]:
        assert (DEPLOY / volume.split(":")[0]).exists()


# --- Kubernetes ------------------------------------------------------------------------


def test_kubernetes_manifests_are_valid() -> None:
    documents = kubernetes_documents()
    version = kubernetes_validate.latest_version()
    for document in documents:
        kubernetes_validate.validate(document, version, strict=True)
    assert {d["kind"] for d in documents} == {
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
    }
    deployment = kubernetes_deployment()
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    for document in documents:
        selector = document["spec"].get("selector", {})
        selector = selector.get("matchLabels", selector)
        assert selector.items() <= labels.items(), document["kind"]
    (hpa,) = [d for d in documents if d["kind"] == "HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]

    (container,) = pod["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    pre_stop_s = int(pre_stop[1]) if pre_stop[0] == "sleep" else 0
    # Streams close within graceful_timeout after SIGTERM, which comes after preStop.
    assert pod["spec"]["terminationGracePeriodSeconds"] > pre_stop_s + gunicorn_setting(
        "graceful_timeout"
    )
    # readOnlyRootFilesystem: /tmp (the metrics directory) must be a volume.
    assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"])


# --- systemd ---------------------------------------------------------------------------


def test_the_systemd_unit(tmp_path: Path) -> None:
    service = systemd_unit()["Service"]
    assert service["User"] not in ("root", "0")
    assert int(service["TimeoutStopSec"]) > gunicorn_setting("graceful_timeout")
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing: tests/run.sh installs systemd", pytrace=False)
    # systemd's own check, with the unit pointed at this checkout and its virtualenv.
    text = (DEPLOY / "streamer.service").read_text()
    text = text.replace("/opt/streamer/.venv/bin/", f"{BIN}/").replace("/opt/streamer", str(ROOT))
    unit = tmp_path / "streamer.service"
    unit.write_text(text)
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    problems = [
        line for line in (result.stdout + result.stderr).splitlines() if "streamer.service" in line
    ]
    assert problems == []


# --- nginx with TLS --------------------------------------------------------------------


def shared_part(template: str) -> str:
    """The upstream and maps, and the locations (what both nginx templates share)."""
    text = (DEPLOY / template).read_text()
    head = text[text.index("upstream streamer {") : text.index("server {")]
    locations = text[text.index("    # Metrics are for") :]
    return head + locations


def test_the_tls_template_proxies_like_the_plain_one() -> None:
    assert shared_part("nginx-tls.conf.template") == shared_part("nginx.conf.template")
    assert "deploy/nginx-tls.conf.template" in (ROOT / "SECURITY.md").read_text()


def test_nginx_terminates_tls_in_front_of_streamer(
    tmp_path: Path, process_env: dict[str, str], start_process: StartProcess
) -> None:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    assert Path(nginx).exists(), "nginx is not installed: tests/run.sh installs it"
    server = start_process(["streamer", "serve", "--port", "{port}"], process_env)
    server.wait_healthy()
    cert, key = self_signed_certificate(tmp_path)
    plain_port, tls_port = free_port(), free_port()
    site = string.Template((DEPLOY / "nginx-tls.conf.template").read_text()).safe_substitute(
        STREAMER_UPSTREAM=f"127.0.0.1:{server.port}",
        NGINX_PORT=f"127.0.0.1:{plain_port}",
        NGINX_TLS_PORT=f"127.0.0.1:{tls_port}",
        NGINX_SERVER_NAME="localhost",
        NGINX_TLS_CERT=str(cert),
        NGINX_TLS_KEY=str(key),
        NGINX_ACCESS_LOG=str(tmp_path / "access.log"),
    )
    assert "${" not in site.replace("${path}", "")  # the one nginx variable in braces
    (tmp_path / "streamer.conf").write_text(site)
    conf = tmp_path / "nginx.conf"
    conf.write_text(MAIN_CONF.format(dir=tmp_path))
    check = subprocess.run(
        [nginx, "-t", "-p", str(tmp_path), "-c", str(conf)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert check.returncode == 0, check.stderr
    process = subprocess.Popen(
        [nginx, "-p", str(tmp_path), "-c", str(conf), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        context = ssl.create_default_context(cafile=str(cert))

        def get(url: str) -> tuple[int, dict[str, str], bytes]:
            request = urllib.request.Request(url)
            try:
                with urllib.request.urlopen(request, timeout=2, context=context) as response:
                    return response.status, dict(response.headers), response.read()
            except urllib.error.HTTPError as exc:
                return exc.code, dict(exc.headers), exc.read()

        def healthy() -> tuple[int, dict[str, str], bytes] | None:
            try:
                return get(f"https://localhost:{tls_port}/healthz")
            except (OSError, ssl.SSLError):
                return None

        status, headers, body = eventually_sync(healthy, what="nginx over TLS", timeout=10)
        assert (status, json.loads(body)) == (200, {"status": "ok"})
        assert headers["Strict-Transport-Security"].startswith("max-age=")
        assert get(f"https://localhost:{tls_port}/metrics")[0] == 404

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args: Any, **kwargs: Any) -> None:
                return None

        opener = urllib.request.build_opener(NoRedirect)
        with pytest.raises(urllib.error.HTTPError) as redirect:
            opener.open(f"http://localhost:{plain_port}/x?y=1", None, 2)
        assert redirect.value.code == 301
        assert redirect.value.headers["Location"] == "https://localhost/x?y=1"
    finally:
        terminate(process)
