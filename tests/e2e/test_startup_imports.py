"""What a worker or a one-shot command imports at start: not the HTTP framework nor the
NATS client when it does not use them (each was 6-12 % of a worker's start-up, and the
suite alone starts ~270 workers). Run in a fresh interpreter: this process has imported
everything already."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = """
import sys
from loyalty.cli import app  # every command group, as `loyalty ...` loads them
from loyalty.cli.common import open_database
from loyalty.bootstrap import build_pipeline
from loyalty.config import Settings

db = open_database(Settings(database_url=sys.argv[1]), create=True)
build_pipeline(db)
print(",".join(sorted(m for m in ("fastapi", "starlette", "nats") if m in sys.modules)))
"""


def test_a_worker_on_the_database_log_imports_neither_fastapi_nor_nats(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'loyalty.db'}"
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, url], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"imported at start: {done.stdout.strip()}"
