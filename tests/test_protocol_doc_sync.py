"""docs/protocol.md documents every message and struct with exactly the fields the code has."""
import os

from tests.schema_tables import documented, expected

DOC = os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs", "protocol.md")


def test_every_table_matches_the_schemas():
    with open(DOC) as f:
        doc = documented(f.read())
    want = expected()
    missing = sorted(set(want) - set(doc))
    assert not missing, f"undocumented: {missing}"
    stale = [h for h in want if doc[h] != want[h]]
    assert not stale, f"tables out of date (python -m tests.schema_tables --fix docs/protocol.md): {stale}"
