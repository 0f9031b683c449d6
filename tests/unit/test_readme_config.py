"""The configuration table of docs/configuration.md (linked from the README) is generated
from ``Settings``: this test fails when they disagree. Regenerate it with::

    .venv/bin/python -m tests.unit.test_readme_config --write
"""

from __future__ import annotations

import sys
import typing
from pathlib import Path

from loyalty.config import Settings

README = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
START = "<!-- settings-table:start -->"
END = "<!-- settings-table:end -->"


def _default(value: object) -> str:
    return f"`{value}`" if isinstance(value, str) else str(value)


def settings_table() -> str:
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    prefix = str(Settings.model_config.get("env_prefix", ""))
    for name, field in Settings.model_fields.items():
        meaning = field.description or ""
        if typing.get_origin(field.annotation) is typing.Literal:
            choices = ", ".join(f"`{c}`" for c in typing.get_args(field.annotation))
            meaning += f"; one of {choices}"
        rows.append(f"| `{prefix}{name.upper()}` | {_default(field.default)} | {meaning} |")
    return "\n".join(rows)


def readme_table(text: str) -> str:
    assert START in text and END in text, f"docs/configuration.md lost {START!r} ... {END!r}"
    return text.split(START, 1)[1].split(END, 1)[0].strip()


def test_readme_configuration_table_matches_settings() -> None:
    expected = settings_table()
    assert readme_table(README.read_text()) == expected, (
        "docs/configuration.md's table differs from loyalty.config.Settings; run "
        "`.venv/bin/python -m tests.unit.test_readme_config --write`. Expected:\n" + expected
    )


def test_every_setting_is_in_the_table() -> None:
    table = readme_table(README.read_text())
    for name in Settings.model_fields:
        assert f"`LOYALTY_{name.upper()}`" in table


def write() -> None:
    text = README.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{START}\n{settings_table()}\n{END}{tail}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write()
    else:
        print(settings_table())
