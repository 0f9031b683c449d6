"""The README's curl session, extracted and run with bash against a live server, so the
docs never rot. The block sits between ``<!-- readme-session:start -->`` and
``<!-- readme-session:end -->``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from loyalty.config import Settings
from tests.conftest import required_tool
from tests.e2e.live import env_for, serve

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
START, END = "<!-- readme-session:start -->", "<!-- readme-session:end -->"
DOC_BASE = "http://127.0.0.1:8000"


def session_script() -> str:
    text = README.read_text()
    assert START in text and END in text, "the README lost its session markers"
    block = text.split(START, 1)[1].split(END, 1)[0].strip()
    assert block.startswith("```sh\n") and block.endswith("```"), block[:40]
    return block[len("```sh\n") : -len("```")]


def test_the_session_talks_to_the_documented_address() -> None:
    script = session_script()
    assert DOC_BASE in script
    assert ".venv/bin/loyalty keys create" in script


def test_readme_curl_session_runs(settings: Settings, tmp_path: Path) -> None:
    required_tool("curl")
    url = settings.database_url
    script = session_script().replace(".venv/bin/loyalty", f"{sys.executable} -m loyalty.cli")
    with serve(url) as base:
        script = script.replace(DOC_BASE, base)
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=ROOT,
            env=env_for(url),
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    # Every answer the README promises with "# -> {...}" (a complete JSON object) is
    # printed by the session, field for field.
    printed = done.stdout.replace("}{", "}\n{")
    answers = [json.loads(line) for line in printed.splitlines() if line.startswith("{")]
    promised = [
        json.loads(line.removeprefix("# -> "))
        for line in session_script().splitlines()
        if line.startswith("# -> {") and line.endswith("}") and "..." not in line
    ]
    assert promised, "no complete answers documented"
    for expected in promised:
        assert expected in answers, (expected, answers)
    member = next(a for a in answers if "rank" in a)
    assert member["currency"] == 11 and member["rank"] == "bronze"
    assert answers[0]["version"] == 2
