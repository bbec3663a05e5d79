"""`kvtier serve --max-request-body-bytes`: a bad size is a usage error naming the flag and
the value. Before, `abc` read "invalid parse_size value: 'abc'", and `0` passed the parser
and failed later as "max_request_body_bytes must be >= 1", without the value."""

from __future__ import annotations

import pytest

from kvtier.cli import build_parser
from kvtier.server.args import cors_list


@pytest.mark.parametrize(("value", "message"), [
    ("abc", "cannot parse size 'abc' (expected e.g. 8GiB, 512MB or 1000000)"),
    ("1XB", "cannot parse size '1XB'"),
    ("0", "must be at least 1 byte, got '0'"),
    ("0.5", "must be at least 1 byte, got '0.5'"),
    ("0KiB", "must be at least 1 byte, got '0KiB'"),
])
def test_a_bad_body_size_is_a_usage_error(value: str, message: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["serve", "--max-request-body-bytes", value])
    assert exited.value.code == 2
    assert f"argument --max-request-body-bytes: {message}" in capsys.readouterr().err


@pytest.mark.parametrize(("value", "size"), [("1", 1), ("4MiB", 4 << 20), ("1.5KB", 1500)])
def test_body_sizes_are_read_with_units(value: str, size: int) -> None:
    args = build_parser().parse_args(["serve", "--max-request-body-bytes", value])
    assert args.max_request_body_bytes == size


@pytest.mark.parametrize("names", [[""], ["served", ""], ["  "]])
def test_an_empty_served_model_name_is_a_usage_error(names: list[str],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """`--served-model-name ''` was accepted and served a model under a name no client can
    pick out (an empty `model` already means the default one); now it exits 2 naming it."""
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["serve", "--served-model-name", *names])
    assert exited.value.code == 2
    bad = next(name for name in names if not name.strip())
    assert (f"argument --served-model-name: must not be empty, got {bad!r}"
            in capsys.readouterr().err)


def test_served_model_names_are_kept_as_given() -> None:
    args = build_parser().parse_args(["serve", "--served-model-name", "a", "org/b"])
    assert args.served_model_name == ["a", "org/b"]


def test_cors_flags_take_values_or_vllms_json_lists() -> None:
    parser = build_parser()
    default = parser.parse_args(["serve"])
    assert [cors_list(default.allowed_origins), cors_list(default.allowed_methods),
            cors_list(default.allowed_headers), default.allow_credentials] == [
        ("*",), ("*",), ("*",), False]
    args = parser.parse_args(["serve", "--allowed-origins", '["http://a", "http://b"]',
                              "--allowed-methods", "GET", "POST", "--allow-credentials"])
    assert cors_list(args.allowed_origins) == ("http://a", "http://b")
    assert cors_list(args.allowed_methods) == ("GET", "POST")
    assert args.allow_credentials


@pytest.mark.parametrize(("value", "message"), [
    ('["http://a",', """'["http://a",' is not a JSON list"""),
    ("[1, 2]", "'[1, 2]' is not a JSON list of strings"),
    (" ", "must not be empty, got ' '"),
])
def test_a_bad_cors_value_is_a_usage_error(value: str, message: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["serve", "--allowed-origins", value])
    assert exited.value.code == 2
    assert f"argument --allowed-origins: {message}" in capsys.readouterr().err
