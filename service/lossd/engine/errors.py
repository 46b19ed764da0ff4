"""The one error type the engine raises.

    EngineError(code, message, field=None, rows=None)
        code     stable, machine-readable; the transports map it to a status in one place each
        message  a sentence a person understands, naming the field and the first offending rows
        field    which input was wrong: "pred", "target", "weights", "params.alpha", "box_format", ...
        rows     the first few offending row indices (at most MAX_ROWS), and n_rows how many there were

Codes (stable; add, never rename):
    unknown_loss, unknown_metric, unknown_format, unknown_reduction, unknown_param, unknown_dtype
    invalid_param        a parameter of the wrong type or not one of its choices
    param_out_of_range   a parameter outside its documented range
    invalid_shape        an array of the wrong rank or width
    length_mismatch      arrays that must have the same number of rows don't
    non_finite           NaN or inf in an input
    inverted_box         x2 < x1 / y2 < y1 (xyxy) or a negative width/height (xywh, cxcywh)
    invalid_value        a value outside its domain (probability > 1, class index out of range, weight < 0)
    too_large            a request over a size budget (pairwise N x M)
"""

from __future__ import annotations

from typing import Sequence

MAX_ROWS = 10

CODES = frozenset(
    {
        "unknown_loss",
        "unknown_metric",
        "unknown_format",
        "unknown_reduction",
        "unknown_param",
        "unknown_dtype",
        "invalid_param",
        "param_out_of_range",
        "invalid_shape",
        "length_mismatch",
        "non_finite",
        "inverted_box",
        "invalid_value",
        "too_large",
    }
)


class EngineError(ValueError):
    """Invalid input to the engine. Never raised for an internal fault."""

    def __init__(self, code: str, message: str, *, field: str | None = None, rows: Sequence[int] | None = None,
                 n_rows: int | None = None) -> None:
        if code not in CODES:
            raise AssertionError(f"unregistered engine error code {code!r}")
        rows_list = [int(r) for r in rows[:MAX_ROWS]] if rows is not None else None
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.rows = rows_list
        self.n_rows = n_rows if n_rows is not None else (len(rows) if rows is not None else None)

    def to_dict(self) -> dict:
        details: dict = {}
        if self.field is not None:
            details["field"] = self.field
        if self.rows is not None:
            details["rows"] = self.rows
            details["n_rows"] = self.n_rows
        return {"code": self.code, "message": self.message, "details": details}

    def __repr__(self) -> str:
        return f"EngineError({self.code!r}, {self.message!r})"


QUOTE_CHARS = 100


def quote(value: object, limit: int = QUOTE_CHARS) -> str:
    """repr(value), cut to ``limit`` characters: client text never travels back whole."""
    try:
        text = value if isinstance(value, str) and value.startswith(("'", '"')) else repr(value)
    except Exception:  # a hostile __repr__ cannot come from JSON or protobuf, but never fail while failing
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def rows_phrase(rows: Sequence[int], total: int) -> str:
    """'rows 3, 7, 9' or 'rows 3, 7, 9, ... (42 rows)'."""
    shown = ", ".join(str(int(r)) for r in rows[:MAX_ROWS])
    word = "row" if total == 1 else "rows"
    return f"{word} {shown}" + (f", ... ({total} rows)" if total > MAX_ROWS else "")
