"""The rules editor's error lines: every value of a JSON text is found at the line where
it starts, whatever the layout (hypothesis over documents and indentations)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from loyalty.console.locate import line_of, value_lines

KEYS = st.text('abxyz_09é\\"', min_size=1, max_size=6)  # escapes too; no "." or "[" (paths)
DOCS = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=20,
)


def paths(doc: Any, path: str = "") -> set[str]:
    found = {path}
    if isinstance(doc, dict):
        for key, value in doc.items():
            found |= paths(value, f"{path}.{key}" if path else key)
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            found |= paths(value, f"{path}[{i}]")
    return found


@given(DOCS, st.sampled_from([None, 0, 2, "\t"]))
def test_every_value_is_found_at_the_line_it_starts_on(doc: Any, indent: int | str | None) -> None:
    text = json.dumps(doc, indent=indent, ensure_ascii=False)
    lines = value_lines(text)
    assert set(lines) == paths(doc)
    assert all(1 <= n <= text.count("\n") + 1 for n in lines.values())
    assert list(lines.values()) == sorted(lines.values())  # in document order
    if indent is not None:  # one value per line: siblings on lines of their own
        for path, line in lines.items():
            if path.endswith("]") and not path.endswith("[0]"):
                index = int(path[path.rindex("[") + 1 : -1])
                assert line > lines[f"{path[: path.rindex('[')]}[{index - 1}]"]


def test_a_rules_error_points_at_its_line_or_the_nearest_enclosing_one() -> None:
    text = '{\n  "rules": [],\n  "ranks": [\n    {"name": "",\n     "min_rank_points": -1}\n  ]\n}'
    assert line_of(text, "ranks[0].name") == 4
    assert line_of(text, "ranks[0].min_rank_points") == 5
    assert line_of(text, "ranks[0].privileges[2]") == 4  # absent: its rank's line
    assert line_of(text, "ranks") == 3 and line_of(text, "") == 1
    assert line_of('{"a": ', "a") is None  # not JSON: no lines
