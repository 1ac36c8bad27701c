"""Numbers in settings and flags are ASCII digits: Python's int() and float() also take
other scripts' digits and underscores, values an operator would read as something else."""

from __future__ import annotations

import pytest

from streamer.cli import _parser
from streamer.config import Config, ConfigError

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
