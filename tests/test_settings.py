"""Settings as the service reads them: numbers in settings and flags are ASCII digits
(Python's int() and float() also take other scripts' digits and underscores, values an
operator would read as something else), and URLs are shown without their passwords."""

from __future__ import annotations

from pathlib import Path

import pytest

import streamer
from streamer.cli import _parser
from streamer.config import STREAMER_JS_POLL_ANSWER_S, Config, ConfigError, without_password

SECRET = "s" * 40


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("STREAMER_HISTORY_SIZE", "1_000"),
        ("STREAMER_HISTORY_SIZE", "\u0661\u0660\u0660"),  # Arabic-Indic digits: 100 to int()
        ("STREAMER_MAX_CONNECTIONS", "\uff11\uff10"),  # full-width digits
        ("STREAMER_HEARTBEAT_S", "1_5"),
        ("STREAMER_HEARTBEAT_S", "\uff12"),
        ("STREAMER_COMMANDS_PER_S", "\u0665"),
    ],
)
def test_a_number_setting_with_digits_other_than_ascii_is_refused(
    variable: str, value: str
) -> None:
    with pytest.raises(ConfigError, match=f"{variable} must be"):
        Config.from_env({"STREAMER_SECRET": SECRET, variable: value})


@pytest.mark.parametrize(
    ("variable", "value", "setting", "expected"),
    [
        ("STREAMER_HISTORY_SIZE", "100", "history_size", 100),
        ("STREAMER_HEARTBEAT_S", "1.5", "heartbeat_s", 1.5),
        ("STREAMER_HEARTBEAT_S", "2e1", "heartbeat_s", 20.0),
        ("STREAMER_COMMANDS_PER_S", " 5 ", "commands_per_s", 5.0),
    ],
)
def test_ascii_numbers_are_read(variable: str, value: str, setting: str, expected: float) -> None:
    config = Config.from_env({"STREAMER_SECRET": SECRET, variable: value})
    assert getattr(config, setting) == expected


@pytest.mark.parametrize(
    "port",
    ["\uff18\uff10\uff18\uff10", "\u0668\u0660\u0668\u0660", "8_080", "+8080", " 8080", "0008080"],
)
def test_serve_refuses_a_port_that_is_not_ascii_digits(
    port: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args(["serve", "--port", port])
    assert exit_info.value.code == 2
    assert "must be a port number from 1 to 65535" in capsys.readouterr().err


def test_serve_reads_an_ascii_port() -> None:
    assert _parser().parse_args(["serve", "--port", "8080"]).port == 8080


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:S3cret@h:1/0", "redis://***@h:1/0"),
        ("redis://user:S3cret@h/0", "redis://***@h/0"),
        ("redis://:p@S3cret@h/0", "redis://***@h/0"),  # the host follows the last @
        (
            "redis://h/0?password=S3cret&socket_timeout=5",
            "redis://h/0?password=***&socket_timeout=5",
        ),
        (
            "redis://h/0?socket_timeout=5&%70assword=S3cret",
            "redis://h/0?socket_timeout=5&%70assword=***",
        ),
        ("rediss://h?ssl_password=S3cret", "rediss://h?ssl_password=***"),
        ("unix:///run/redis.sock?password=S3cret&db=1", "unix:///run/redis.sock?password=***&db=1"),
        ("redis+sentinel://:S3cret@a:1,b:2/main", "redis+sentinel://***@a:1,b:2/main"),
        ("redis://h:1/0", "redis://h:1/0"),
        # A password with a / ? # or @ its writer did not escape.
        ("redis://:S3c/ret@h/0", "redis://***@h/0"),
        ("redis://:S3c#ret@h/0?password=S3cret", "redis://***@h/0?password=***"),
        ("redis://:S3c?ret@h/0", "redis://***@h/0"),
        ("redis://h/0?password=S3c@ret", "redis://h/0?password=***"),
    ],
)
def test_a_url_is_shown_without_its_password(url: str, shown: str) -> None:
    assert without_password(url) == shown


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:1/x?password=S3cret",  # a bad database
        "redis://127.0.0.1:1/0?password=S3cret&socket_timeout=x",  # a bad setting
        "ftp://127.0.0.1/0?password=S3cret",
        "redis://:S3c#ret@127.0.0.1:0/0",  # a bad port, a password with a #
        "redis+sentinel://:S3c/ret@127.0.0.1:1/main/x",  # a bad db, a password with a /
        "redis+cluster://:S3c/ret@127.0.0.1:99999",  # a bad port
    ],
)
def test_a_refused_redis_url_is_named_without_its_password(url: str) -> None:
    with pytest.raises(ConfigError, match="STREAMER_REDIS_URL") as refusal:
        Config.from_env({"STREAMER_SECRET": SECRET, "STREAMER_REDIS_URL": url})
    said = str(refusal.value)
    assert "S3c" not in said and "ret" not in said  # neither half of a password split


@pytest.mark.parametrize(
    ("setting", "refused", "taken"),
    [
        ("socket_timeout", ["0", "-1", "nan", "inf", "1e-9", "0.009"], ["0.01", "0.5", "10"]),
        ("socket_connect_timeout", ["0", "-2.5", "0.001"], ["3"]),
        ("health_check_interval", ["-5", "inf"], ["0", "30"]),
        ("max_connections", ["0", "-1"], ["1", "50"]),
    ],
)
def test_connection_settings_that_could_never_work_are_refused(
    setting: str, refused: list[str], taken: list[str]
) -> None:
    """A timeout of 0 or less fails every read: the process would start and never
    reach Redis (readiness 503 for good, a reconnection a second)."""
    for value in refused:
        url = f"redis://127.0.0.1:1/0?{setting}={value}"
        with pytest.raises(ConfigError, match=f"STREAMER_REDIS_URL: \\?{setting}= must be"):
            Config.from_env({"STREAMER_SECRET": SECRET, "STREAMER_REDIS_URL": url})
    for value in taken:
        url = f"redis://127.0.0.1:1/0?{setting}={value}"
        assert (
            Config.from_env({"STREAMER_SECRET": SECRET, "STREAMER_REDIS_URL": url}).redis_url == url
        )


@pytest.mark.parametrize(
    "flags",
    [
        ["token", "--user", "u", "--ttl", "1_000"],
        ["token", "--user", "u", "--ttl", "\u0661\u0660"],
        ["publish", "--user", "u", "--task", "t", "--progress", "\uff15"],
        ["publish", "--user", "u", "--task", "t", "--processed", "1_0"],
        ["publish", "--user", "u", "--task", "t", "--total", "\u0665"],
    ],
)
def test_number_flags_take_ascii_digits_only(
    flags: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args(flags)
    assert exit_info.value.code == 2
    assert "must be " in capsys.readouterr().err


def test_number_flags_read_ascii_numbers() -> None:
    publish = ["publish", "--user", "u", "--task", "t"]
    parsed = _parser().parse_args([*publish, "--progress", "12.5", "--processed", "3"])
    assert (parsed.progress, parsed.processed) == (12.5, 3)
    assert _parser().parse_args(["token", "--user", "u", "--ttl", "60"]).ttl == 60


def test_trusted_proxies_are_read_as_networks() -> None:
    config = Config.from_env(
        {
            "STREAMER_SECRET": SECRET,
            "STREAMER_TRUSTED_PROXIES": " 10.1.2.3, 172.16.0.0/12,fd00::/8,",
        }
    )
    assert [str(network) for network in config.trusted_proxies] == [
        "10.1.2.3/32", "172.16.0.0/12", "fd00::/8",
    ]  # fmt: skip
    everyone = Config.from_env({"STREAMER_SECRET": SECRET, "STREAMER_TRUSTED_PROXIES": "*"})
    assert [str(network) for network in everyone.trusted_proxies] == ["0.0.0.0/0", "::/0"]
    nobody = Config.from_env({"STREAMER_SECRET": SECRET, "STREAMER_TRUSTED_PROXIES": "None"})
    assert nobody.trusted_proxies == ()
    default = Config.from_env({"STREAMER_SECRET": SECRET})
    assert [str(network) for network in default.trusted_proxies] == ["127.0.0.0/8", "::1/128"]


@pytest.mark.parametrize(
    "value", ["nginx", "10.0.0.0/33", "10.0.0.1 10.0.0.2", "::g", "10.1.2.3/8", "fe80::1%eth0"]
)
def test_a_trusted_proxy_that_is_no_address_is_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="STREAMER_TRUSTED_PROXIES must be a comma-separated"):
        Config.from_env({"STREAMER_SECRET": SECRET, "STREAMER_TRUSTED_PROXIES": value})


def test_a_list_of_trusted_proxies_without_one_is_refused() -> None:
    with pytest.raises(ConfigError, match="STREAMER_TRUSTED_PROXIES lists no address"):
        Config.from_env({"STREAMER_SECRET": SECRET, "STREAMER_TRUSTED_PROXIES": ", ,"})


def test_a_misspelt_variable_is_warned_about_and_others_are_left_alone() -> None:
    """A typo would leave a setting at its default without a word (STREAMER_REDIS_ULR:
    the embedded broker); names streamer does not read and that look like none of its
    own are other programs' (Kubernetes' service links for Services named streamer and
    streamer-redis)."""
    environ = {
        "STREAMER_SECRET": SECRET,
        "STREAMER_REDIS_ULR": "redis://127.0.0.1:1/0",
        "STREAMER_HEARTBEAT_SECONDS": "5",
        "STREAMER_SERVICE_HOST": "10.0.0.7",
        "STREAMER_PORT_8080_TCP": "tcp://10.0.0.7:8080",
        "STREAMER_REDIS_PORT": "tcp://10.0.0.8:6379",
        "STREAMER_REDIS_PORT_6379_TCP_ADDR": "10.0.0.8",
        "STREAMER_REDIS_SERVICE_HOST": "10.0.0.8",
        "STREAMER_REDIS_SERVICE_PORT_REDIS": "6379",
        "STREAMER_CELERY_REVOKE": "true",
    }
    config = Config.from_env(environ)
    assert config.redis_url is None
    assert list(config.warnings) == [
        "STREAMER_HEARTBEAT_SECONDS is not a setting of streamer (ignored): "
        "did you mean STREAMER_HEARTBEAT_S?",
        "STREAMER_REDIS_ULR is not a setting of streamer (ignored): "
        "did you mean STREAMER_REDIS_URL?",
    ]


@pytest.mark.parametrize(
    "origin", ["https://user:S3cret@app.example.com", "https://u:S3cret@app.example.com:99999"]
)
def test_a_refused_origin_is_named_without_its_password(origin: str) -> None:
    with pytest.raises(ConfigError, match="STREAMER_ALLOWED_ORIGINS") as refusal:
        Config.from_env({"STREAMER_SECRET": SECRET, "STREAMER_ALLOWED_ORIGINS": origin})
    assert "S3cret" not in str(refusal.value) and "app.example.com" in str(refusal.value)


def test_a_bad_flag_is_named_as_the_flag() -> None:
    """`streamer serve --history-size abc`: the flag is what the user wrote."""
    with pytest.raises(ConfigError, match=r"^--history-size must be an integer, got 'abc'$"):
        Config.from_env({"STREAMER_SECRET": SECRET}, {"history_size": "abc"})
    with pytest.raises(ConfigError, match=r"^STREAMER_HISTORY_SIZE must be an integer"):
        Config.from_env({"STREAMER_SECRET": SECRET, "STREAMER_HISTORY_SIZE": "abc"})


def test_long_polls_held_as_long_as_streamer_js_waits_are_warned_about() -> None:
    assert (
        Config.from_env({"STREAMER_SECRET": SECRET, "STREAMER_POLL_TIMEOUT_S": "59"}).warnings == ()
    )
    config = Config.from_env({"STREAMER_SECRET": SECRET, "STREAMER_POLL_TIMEOUT_S": "120"})
    (warning,) = config.warnings
    assert "STREAMER_POLL_TIMEOUT_S=120 holds long polls as long as streamer.js" in warning
    js = (Path(streamer.__file__).parent / "static" / "streamer.js").read_text()
    assert f"const POLL_ANSWER_MS = {STREAMER_JS_POLL_ANSWER_S * 1000:.0f};" in js


def test_a_per_user_limit_above_the_process_limit_is_warned_about() -> None:
    def warnings(**limits: str) -> tuple[str, ...]:
        return Config.from_env({"STREAMER_SECRET": SECRET, **limits}).warnings

    assert warnings(STREAMER_MAX_CONNECTIONS="20") == ()  # the per-user default, 20
    (warning,) = warnings(STREAMER_MAX_CONNECTIONS="10")
    assert warning == (
        "STREAMER_MAX_CONNECTIONS_PER_USER=20 is above STREAMER_MAX_CONNECTIONS=10: one user "
        "can hold every stream of a process, and no more than 10"
    )
    (warning,) = Config.from_env(
        {"STREAMER_SECRET": SECRET},
        {"max_connections": "5", "max_connections_per_user": "6"},
    ).warnings
    assert warning.startswith("--max-connections-per-user=6 is above --max-connections=5:")
