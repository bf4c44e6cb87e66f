"""The subset of Solr query syntax that DCOR clients send to `package_search` (`q`, `fq`).

Supported: `*:*`, `field:value`, `field:"quoted value"`, wildcards (`name:calib*`), ranges
(`metadata_modified:[2025-01-01T00:00:00Z TO NOW]`, `*` open), `AND`, `OR`, `NOT`, `+`/`-`
prefixes, parentheses, and bare words (case-insensitive search in the text fields). Terms
without an operator between them must all match. Unknown fields are a query error, as Solr
answers "undefined field".
"""

from __future__ import annotations

import datetime
import fnmatch
import re
from collections.abc import Callable, Mapping, Sequence

Document = Mapping[str, Sequence[str]]
Predicate = Callable[[Document], bool]

FIELDS = (
    "id",
    "name",
    "title",
    "notes",
    "authors",
    "organization",
    "owner_org",
    "groups",
    "tags",
    "res_name",
    "res_format",
    "res_id",
    "private",
    "state",
    "license_id",
    "metadata_created",
    "metadata_modified",
)
TEXT_FIELDS = ("name", "title", "notes", "authors", "tags", "res_name", "organization")
_TOKEN = re.compile(
    r"\s*(?:(?P<open>\()|(?P<close>\))|(?P<prefix>[+-])(?=\S)"
    r'|(?P<field>[A-Za-z_.]+):(?P<value>"(?:[^"\\]|\\.)*"|\[[^\]]*\]|[^\s()]+)'
    r'|(?P<quoted>"(?:[^"\\]|\\.)*")|(?P<word>[^\s()]+))'
)


class QueryError(Exception):
    pass


def compile_query(query: str) -> Predicate:
    """A predicate over documents (field -> values) for a query string."""
    tokens = _tokenize(query)
    parser = _Parser(tokens)
    predicate = parser.expression()
    if parser.pos != len(tokens):
        raise QueryError(f"cannot parse {query!r} near {tokens[parser.pos][1]!r}")
    return predicate


def _tokenize(query: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    pos = 0
    query = query.strip()
    while pos < len(query):
        match = _TOKEN.match(query, pos)
        if match is None or match.end() == pos:
            raise QueryError(f"cannot parse {query!r} at {pos}")
        pos = match.end()
        kind = match.lastgroup
        if kind == "value":
            tokens.append(("term", f"{match['field']}:{match['value']}"))
        elif kind == "word" and match["word"] in ("AND", "OR", "NOT", "&&", "||"):
            tokens.append(("op", {"&&": "AND", "||": "OR"}.get(match["word"], match["word"])))
        elif kind in {"word", "quoted"}:
            tokens.append(("term", match[kind]))
        elif kind is not None:
            tokens.append((kind, match[kind]))
    return tokens


class _Parser:
    def __init__(self, tokens: list[tuple[str, str]]) -> None:
        self.tokens = tokens
        self.pos = 0

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def expression(self) -> Predicate:
        """OR of AND-groups; juxtaposition means AND."""
        alternatives = [self.conjunction()]
        while self.peek() == ("op", "OR"):
            self.pos += 1
            alternatives.append(self.conjunction())
        return lambda doc: any(p(doc) for p in alternatives)

    def conjunction(self) -> Predicate:
        parts = [self.unary()]
        while (token := self.peek()) is not None and token not in (("op", "OR"), ("close", ")")):
            if token == ("op", "AND"):
                self.pos += 1
            parts.append(self.unary())
        return lambda doc: all(p(doc) for p in parts)

    def unary(self) -> Predicate:
        token = self.peek()
        if token in (("op", "NOT"), ("prefix", "-")):
            self.pos += 1
            inner = self.unary()
            return lambda doc: not inner(doc)
        if token == ("prefix", "+"):
            self.pos += 1
        return self.atom()

    def atom(self) -> Predicate:
        token = self.peek()
        if token is None:
            raise QueryError("query ends too early")
        self.pos += 1
        if token[0] == "open":
            inner = self.expression()
            if self.peek() != ("close", ")"):
                raise QueryError("missing ')'")
            self.pos += 1
            return inner
        if token[0] != "term":
            raise QueryError(f"unexpected {token[1]!r}")
        return _term(token[1])


def _term(text: str) -> Predicate:
    if text == "*:*":
        return lambda doc: True
    field, sep, value = text.partition(":")
    if sep and re.fullmatch(r"[A-Za-z_.]+", field) and not text.startswith('"'):
        if field not in FIELDS:
            raise QueryError(f"undefined field {field}")
        return _field_term(field, value)
    needle = _unquote(text).lower()
    return lambda doc: any(needle in v.lower() for f in TEXT_FIELDS for v in doc.get(f, ()))


def _field_term(field: str, value: str) -> Predicate:
    if value.startswith("[") and value.endswith("]"):
        low, sep, high = value[1:-1].partition(" TO ")
        if not sep:
            raise QueryError(f"bad range {value!r}")
        lo, hi = _range_bound(low), _range_bound(high)
        return lambda doc: any(
            (lo is None or v >= lo) and (hi is None or v <= hi) for v in doc.get(field, ())
        )
    pattern = _unquote(value)
    if value.startswith('"') or not any(c in pattern for c in "*?"):
        return lambda doc: any(v.lower() == pattern.lower() for v in doc.get(field, ()))
    return lambda doc: any(fnmatch.fnmatch(v.lower(), pattern.lower()) for v in doc.get(field, ()))


def _range_bound(text: str) -> str | None:
    text = _unquote(text.strip()).replace("\\:", ":")
    if text == "*":
        return None
    if text.startswith("NOW"):
        now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
        return now.isoformat(timespec="microseconds")
    return text.rstrip("Z")


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1]
    return re.sub(r"\\(.)", r"\1", text)
