"""`--where`: a small SQL-like row predicate over an input's columns, parsed once (a syntax error
is a ConfigError naming the position) and turned into an Arrow compute expression when the
columns are known (an unknown column or a type clash is an InputError naming it).

Grammar (keywords in any case):
    expr    := or
    or      := and ("OR" and)*
    and     := not ("AND" not)*
    not     := "NOT" not | atom
    atom    := "(" expr ")" | column pred
    pred    := op literal | ["NOT"] "LIKE" string | ["NOT"] "IN" "(" literal ("," literal)* ")"
             | "IS" ["NOT"] "NULL"
    op      := = | != | <> | < | <= | > | >=
    literal := 'string' ('' inside for a quote) | number | TRUE | FALSE
    column  := name (letters, digits, _ and .) | "quoted name"
A row whose predicate is NULL (a null cell compared) is filtered out, as in SQL.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from resnet_features.core.errors import ConfigError, InputError

__all__ = ["Where", "parse_where"]

_TOKEN = re.compile(r"""\s*(?:
    (?P<str>'(?:[^']|'')*')
  | (?P<num>-?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?)
  | (?P<qid>"(?:[^"]|"")+")
  | (?P<id>[A-Za-z_][A-Za-z0-9_.]*)
  | (?P<op><=|>=|<>|!=|=|<|>|\(|\)|,)
)""", re.VERBOSE)
_KEYWORDS = {"AND", "OR", "NOT", "LIKE", "IN", "IS", "NULL", "TRUE", "FALSE"}
_OPS = {"=": "equal", "!=": "not_equal", "<>": "not_equal", "<": "less", "<=": "less_equal",
        ">": "greater", ">=": "greater_equal"}


def _tokens(text: str) -> list[tuple[str, Any, int]]:
    out, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if not m:
            start = len(text) - len(text[pos:].lstrip())
            raise ConfigError(f"--where {text!r}: cannot read {text[start:start + 12]!r} at "
                              f"character {start + 1}; quote strings as 'text' and column names "
                              f"with special characters as \"name\"")
        kind = m.lastgroup
        raw = m.group(kind)
        at = m.start(kind) + 1
        if kind == "str":
            out.append(("lit", raw[1:-1].replace("''", "'"), at))
        elif kind == "num":
            out.append(("lit", float(raw) if any(c in raw for c in ".eE") else int(raw), at))
        elif kind == "qid":
            out.append(("col", raw[1:-1].replace('""', '"'), at))
        elif kind == "id" and raw.upper() in _KEYWORDS:
            word = raw.upper()
            if word in ("TRUE", "FALSE"):
                out.append(("lit", word == "TRUE", at))
            else:
                out.append(("kw", word, at))
        elif kind == "id":
            out.append(("col", raw, at))
        else:
            out.append(("op", raw, at))
        pos = m.end()
    return out


class _Parser:
    def __init__(self, text: str):
        self.text, self.toks, self.i = text, _tokens(text), 0

    def fail(self, what: str):
        at = self.toks[self.i][2] if self.i < len(self.toks) else len(self.text) + 1
        got = (f"{self.toks[self.i][1]!r}" if self.i < len(self.toks) else "the end")
        raise ConfigError(f"--where {self.text!r}: expected {what} at character {at}, got {got} "
                          f"(e.g. --where \"status = 'success' AND size < 50000000\")")

    def peek(self, kind: str, value: Any = None) -> bool:
        if self.i >= len(self.toks):
            return False
        k, v, _ = self.toks[self.i]
        return k == kind and (value is None or v == value)

    def take(self, kind: str, value: Any = None, what: str = "") -> Any:
        if not self.peek(kind, value):
            self.fail(what or (value if value is not None else kind))
        self.i += 1
        return self.toks[self.i - 1][1]

    def parse(self) -> tuple:
        if not self.toks:
            raise ConfigError("--where is empty; give a predicate such as \"status = 'success'\"")
        tree = self.or_()
        if self.i != len(self.toks):
            self.fail("AND, OR or the end")
        return tree

    def or_(self):
        left = self.and_()
        while self.peek("kw", "OR"):
            self.i += 1
            left = ("or", left, self.and_())
        return left

    def and_(self):
        left = self.not_()
        while self.peek("kw", "AND"):
            self.i += 1
            left = ("and", left, self.not_())
        return left

    def not_(self):
        if self.peek("kw", "NOT"):
            self.i += 1
            return ("not", self.not_())
        if self.peek("op", "("):
            self.i += 1
            inner = self.or_()
            self.take("op", ")", "')'")
            return inner
        column = self.take("col", what="a column name")
        return self.pred(column)

    def literal(self) -> Any:
        return self.take("lit", what="a value ('text', a number, TRUE or FALSE)")

    def pred(self, column: str) -> tuple:
        if self.i < len(self.toks) and self.toks[self.i][0] == "op" and self.toks[self.i][1] in _OPS:
            op = _OPS[self.take("op")]
            return ("cmp", op, column, self.literal())
        negated = False
        if self.peek("kw", "IS"):
            self.i += 1
            if self.peek("kw", "NOT"):
                self.i += 1
                negated = True
            self.take("kw", "NULL", "NULL")
            return ("null", column, negated)
        if self.peek("kw", "NOT"):
            self.i += 1
            negated = True
        if self.peek("kw", "LIKE"):
            self.i += 1
            pattern = self.literal()
            if not isinstance(pattern, str):
                self.i -= 1
                self.fail("a 'pattern' string after LIKE")
            return ("like", column, pattern, negated)
        if self.peek("kw", "IN"):
            self.i += 1
            self.take("op", "(", "'('")
            values = [self.literal()]
            while self.peek("op", ","):
                self.i += 1
                values.append(self.literal())
            self.take("op", ")", "')'")
            return ("in", column, values, negated)
        self.fail(f"a comparison after column {column!r} (=, !=, <, <=, >, >=, LIKE, IN, IS NULL)")
        raise AssertionError  # fail raises


def _columns(tree: tuple) -> list[str]:
    if tree[0] in ("and", "or"):
        return _columns(tree[1]) + _columns(tree[2])
    if tree[0] == "not":
        return _columns(tree[1])
    return [tree[2] if tree[0] == "cmp" else tree[1]]


@dataclass(frozen=True)
class Where:
    """A parsed --where predicate: its text, the columns it reads, and its Arrow expression."""

    text: str
    tree: tuple

    @property
    def columns(self) -> list[str]:
        """The columns the predicate reads, in order of first use (what a reader must fetch)."""
        return list(dict.fromkeys(_columns(self.tree)))

    def check_columns(self, names: list[str], what: str) -> None:
        missing = [c for c in self.columns if c not in names]
        if missing:
            raise InputError(f"--where {self.text!r}: {what} has no column(s) "
                             f"{', '.join(missing)} (columns: {', '.join(names)})")

    def expression(self, schema=None):
        """The predicate as a `pyarrow.compute.Expression`. With the `schema` of the data, a
        string compared with a timestamp or date column is read as one ('2026-01-01')."""
        import pyarrow.compute as pc

        def value(column: str, v: Any):
            import pyarrow as pa

            if schema is None or column not in schema.names or not isinstance(v, str):
                return v
            t = schema.field(column).type
            if pa.types.is_timestamp(t) or pa.types.is_date(t):
                try:
                    if pa.types.is_timestamp(t) and t.tz is not None:
                        try:
                            return pa.scalar(v).cast(t)
                        except pa.ArrowInvalid:  # no offset written: the column's zone
                            naive = pa.scalar(v).cast(pa.timestamp(t.unit))
                            return pa.scalar(naive.value, type=t)
                    return pa.scalar(v).cast(t)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                    raise InputError(f"--where {self.text!r}: {v!r} is no {t} for column "
                                     f"{column!r}: {exc}") from None
            return v

        def build(node: tuple):
            kind = node[0]
            if kind == "and":
                return build(node[1]) & build(node[2])
            if kind == "or":
                return build(node[1]) | build(node[2])
            if kind == "not":
                return ~build(node[1])
            if kind == "cmp":
                _, op, column, v = node
                return getattr(pc, op)(pc.field(column), pc.scalar(value(column, v)))
            if kind == "null":
                e = pc.field(node[1]).is_null()
                return ~e if node[2] else e
            if kind == "like":
                e = pc.match_like(pc.field(node[1]), pattern=node[2])
                return ~e if node[3] else e
            _, column, values, negated = node
            e = pc.field(column).isin([value(column, v) for v in values])
            return ~e if negated else e

        return build(self.tree)

    def mask(self, table):
        """A boolean numpy mask over `table`'s rows (null counts as False); InputError when the
        predicate does not fit the column types (e.g. a number compared with a text column)."""
        import numpy as np
        import pyarrow as pa

        self.check_columns(table.column_names, "the input")
        indexed = table.select(self.columns).append_column(
            "__row__", pa.array(np.arange(table.num_rows, dtype=np.int64)))
        try:
            kept = indexed.filter(self.expression(table.schema)).column("__row__")
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
            types = ", ".join(f"{c}: {table.schema.field(c).type}" for c in self.columns)
            raise InputError(f"--where {self.text!r} does not fit the column types ({types}): "
                             f"{str(exc).splitlines()[0]}") from None
        keep = np.zeros(table.num_rows, dtype=bool)
        keep[kept.to_numpy()] = True
        return keep


def parse_where(text: str | None) -> Where | None:
    """The parsed predicate, None when absent; ConfigError on a syntax error."""
    if text is None:
        return None
    return Where(text=text, tree=_Parser(text).parse())
