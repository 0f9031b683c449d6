"""``loyalty migrate`` from the wheel, built from exactly what the Dockerfile copies.

No Docker engine runs here, so the image is checked the way it is built: the build
stage's COPY sources (minus .dockerignore) are copied to a temporary directory, a wheel
is built there (``pip wheel``, as the image's ``pip install .`` does), installed into a
fresh virtualenv (``--no-deps``; the dependencies come from this venv's site-packages)
and its ``loyalty migrate`` upgrades a fresh SQLite file with the packaged scripts."""

from __future__ import annotations

import fnmatch
import shutil
import sqlite3
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from loyalty.adapters.migrate import head_revision
from tests.e2e.live import env_for

ROOT = Path(__file__).resolve().parents[2]


def build_stage_copies() -> list[str]:
    """The sources of the Dockerfile's COPY instructions before the final FROM."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    last_from = max(i for i, ln in enumerate(lines) if ln.startswith("FROM "))
    sources: list[str] = []
    for line in lines[:last_from]:
        if line.startswith("COPY ") and "--from" not in line:
            sources += line.split()[1:-1]
    return sources


def docker_ignored(path: str) -> bool:
    """Whether .dockerignore keeps ``path`` (relative, '/'-separated) out of the context."""
    patterns = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        simple = pattern.removeprefix("**/")
        for prefix in prefixes:
            if fnmatch.fnmatch(prefix, pattern) or fnmatch.fnmatch(prefix.split("/")[-1], simple):
                return True
    return False


def tracked(source: str) -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", source],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [p for p in listed if (ROOT / p).is_file()]


def test_the_image_context_holds_the_package_and_the_migrations() -> None:
    sources = build_stage_copies()
    assert {"pyproject.toml", "README.md", "loyalty", "alembic"} <= set(sources)
    for source in sources:
        files = tracked(source)
        assert files, source
        kept = [f for f in files if not docker_ignored(f)]
        assert kept == files, (source, set(files) - set(kept))
    assert not docker_ignored("alembic/versions/0001_foundation.py")
    assert not docker_ignored("alembic/env.py") and not docker_ignored("alembic/script.py.mako")
    assert docker_ignored("loyalty/__pycache__/cli.cpython-311.pyc")


@pytest.mark.slow
def test_loyalty_migrate_from_the_wheel(tmp_path: Path) -> None:
    context = tmp_path / "context"
    for source in build_stage_copies():
        for name in tracked(source):
            if not docker_ignored(name):
                (context / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, context / name)
    dist = tmp_path / "dist"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(dist), "."],
        cwd=context,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = dist.glob("loyalty-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    scripts = sorted(p.name for p in (ROOT / "alembic" / "versions").glob("*.py"))
    assert {f"loyalty/migrations/versions/{n}" for n in scripts} <= names
    assert {"loyalty/migrations/env.py", "loyalty/migrations/script.py.mako"} <= names
    packages = {
        str(p.parent.relative_to(ROOT)) + "/__init__.py" for p in (ROOT / "loyalty").rglob("*.py")
    }
    assert packages <= names, f"a package is missing from pyproject.toml: {packages - names}"
    console = {  # the console's templates and vendored assets (with their licence)
        str(p.relative_to(ROOT))
        for p in (ROOT / "loyalty" / "console").rglob("*")
        if p.is_file() and p.suffix not in (".py", ".pyc")
    }
    assert "loyalty/console/static/htmx/LICENSE" in console
    assert console <= names, f"missing from package-data: {console - names}"

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # the dependencies from this venv, after the new venv's own site-packages
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet"]
        + ["--no-deps", "--no-index", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stderr

    work = tmp_path / "elsewhere"  # not the checkout: its alembic/ is out of reach
    work.mkdir()
    url = f"sqlite:///{work}/loyalty.db"
    where = subprocess.run(
        [
            str(python),
            "-c",
            "from loyalty.adapters import migrate; print(migrate.script_location())",
        ],
        cwd=work,
        env=env_for(url),
        capture_output=True,
        text=True,
    )
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()) == Path(site) / "loyalty" / "migrations"
    migrated = subprocess.run(
        [str(venv / "bin" / "loyalty"), "migrate"],
        cwd=work,
        env=env_for(url),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert migrated.returncode == 0, migrated.stderr
    with sqlite3.connect(work / "loyalty.db") as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone() == (
            head_revision(),
        )
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    assert {"ingress_events", "stored_events", "forget_requests"} <= tables  # + event store
