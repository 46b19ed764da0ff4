"""The error table (lossd/errors.py): every code has a row, every transport reads it, and nothing else in the
package decides a status."""

from __future__ import annotations

import ast
from pathlib import Path

import grpc
import pytest

from lossd.engine.errors import CODES
from lossd.engine import EngineError
from lossd.errors import TABLE, ServiceError, describe, parsing, quote
from lossd.rest.errors import error_response

PACKAGE = Path(__file__).resolve().parents[2] / "service" / "lossd"
# the only modules that may name a status: the table and the two adapters that read it
STATUS_MODULES = {"errors.py", "rest/errors.py", "grpc_server/errors.py"}


def test_every_engine_code_has_a_row():
    assert CODES <= set(TABLE), sorted(CODES - set(TABLE))


@pytest.mark.parametrize("code", sorted(TABLE))
def test_each_row_is_read_by_both_transports(code):
    row = TABLE[code]
    exc = EngineError(code, "m") if code in CODES else ServiceError("m", code)
    assert error_response("/v1/losses/x", exc).status_code == row.v1
    assert error_response("/v2/models/x/infer", exc).status_code == row.oip
    assert isinstance(getattr(grpc.StatusCode, row.grpc), grpc.StatusCode)
    assert 400 <= row.oip < 600 and 400 <= row.v1 < 600


@pytest.mark.parametrize("code", sorted(TABLE))
def test_the_clients_stream_item_status_is_the_tables(code):
    """A stream item's error carries only its code; the client gives it the status (and so the error class) the
    same code has on a call of its own, from a copy of this table that must not drift from it."""
    from lossd_client._transport import STREAM_STATUS

    assert STREAM_STATUS.get(code, "INVALID_ARGUMENT") == TABLE[code].grpc


def test_bad_input_on_v2_is_400_as_triton_answers():
    for code in CODES - {"unknown_loss", "unknown_metric", "too_large"}:
        assert TABLE[code].oip == 400 and TABLE[code].v1 == 422 and TABLE[code].grpc == "INVALID_ARGUMENT"


def test_unregistered_codes_are_refused():
    with pytest.raises(AssertionError):
        ServiceError("m", "no_such_code")


def test_internal_faults_hide_their_text(caplog):
    info = describe(KeyError("secret internals"))
    assert info.code == "internal" and info.row.v1 == 500 and info.row.grpc == "INTERNAL"
    assert "secret" not in info.message and "secret internals" in caplog.text


def test_client_text_is_cut_everywhere():
    assert len(quote("x" * 100_000)) < 130
    info = describe(EngineError("unknown_format", "bad " + "y" * 50_000, field="f" * 5000))
    assert len(info.message) <= 1000 and len(info.field) <= 110
    headers = dict(describe(ServiceError("m", field="\u00e9\n\x00" + "z" * 5000)).headers())
    assert headers["lossd-error-field"].isascii() and len(headers["lossd-error-field"]) <= 100


@pytest.mark.parametrize("exc", [ValueError("v"), OverflowError("o"), TypeError("t"), RecursionError(),
                                 UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad"), KeyError("k")])
def test_parsing_turns_parser_errors_into_invalid_request(exc):
    with pytest.raises(ServiceError) as info:
        with parsing("inputs.PRED.data"):
            raise exc
    assert info.value.code == "invalid_request" and info.value.field == "inputs.PRED.data"


def test_parsing_lets_engine_errors_through():
    with pytest.raises(EngineError):
        with parsing("x"):
            raise EngineError("non_finite", "nan")


def _status_literals(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) \
                and node.value.attr == "StatusCode" and node.attr != "OK":
            found.append(f"StatusCode.{node.attr}")
        if isinstance(node, ast.keyword) and node.arg in ("status_code", "status") \
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, int) \
                and node.value.value >= 400:
            found.append(f"{node.arg}={node.value.value}")
    return found


def test_no_status_is_decided_outside_the_table():
    offenders = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel in STATUS_MODULES:
            continue
        found = _status_literals(ast.parse(path.read_text()))
        if found:
            offenders[rel] = found
    assert not offenders, offenders
