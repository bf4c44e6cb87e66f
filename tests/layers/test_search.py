"""The Solr subset of package_search."""

from __future__ import annotations

import pytest

from dcorfs.devserver.search import QueryError, compile_query

DOC = {
    "name": ["hl60-deformability"],
    "title": ["HL60 cells, treated"],
    "organization": ["demo-lab"],
    "groups": ["showcase", "blood"],
    "tags": ["HL60"],
    "private": ["false"],
    "metadata_modified": ["2025-03-07T08:20:01.654321"],
}


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("*:*", True),
        ("organization:demo-lab", True),
        ("organization:other", False),
        ("groups:blood", True),
        ("+organization:demo-lab +groups:showcase", True),
        ("organization:demo-lab -groups:showcase", False),
        ("(organization:a OR organization:demo-lab)", True),
        ("organization:a OR organization:b", False),
        ("name:hl60*", True),
        ('title:"HL60 cells, treated"', True),
        ("treated", True),
        ("hl60 untreated", False),
        ("NOT private:true", True),
        ("metadata_modified:[2025-01-01T00\\:00\\:00Z TO NOW]", True),
        ("metadata_modified:[2026-01-01T00:00:00Z TO *]", False),
        ("organization:demo-lab AND (tags:HL60 OR tags:x)", True),
    ],
)
def test_queries(query: str, expected: bool) -> None:
    assert compile_query(query)(DOC) is expected


@pytest.mark.parametrize(
    "query", ["unknown:x", "(organization:a", "organization:a)", "metadata_modified:[a]"]
)
def test_bad_queries(query: str) -> None:
    with pytest.raises(QueryError):
        compile_query(query)
