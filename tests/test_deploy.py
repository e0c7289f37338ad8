"""The deployment files (Dockerfile, deploy/compose.yaml, deploy/prometheus.yml, deploy/nginx.conf) agree
with each other and with the code: every `fidellm serve` flag they pass parses with the real click
command (a typo or a bad value fails here, not at `docker compose up`), Prometheus scrapes and nginx
balances exactly the model-server replicas on the port they listen on, and the paths they probe exist
in the app. Docker itself is not needed: the files are read as YAML and plain text."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from fastapi.routing import APIRoute

from fidellm.serve.app import create_app
from fidellm.serve.cli import serve_command
from fidellm.serve.common import ServeSettings
from fidellm.tokenizer.bytes import ByteTokenizer
from fixtures.models import gqa_config, random_llama

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
REPLICAS = 3

COMPOSE_VARIABLE = re.compile(r"\$\{(\w+)(?::?([-?])([^}]*))?\}")
NGINX_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
NGINX_TIME_UNITS = {"ms": 0.001, "": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def interpolate(value: Any) -> str:
    """A compose value with its variables filled in: `${VAR:-default}` gives the default; a required
    `${VAR:?message}` or a plain `${VAR}` gives a stand-in."""

    def fill(match: re.Match[str]) -> str:
        name, kind, default = match.groups()
        return default if kind == "-" else f"stand-in-{name.lower()}"

    return COMPOSE_VARIABLE.sub(fill, str(value))


def parse_serve_args(args: list[str], existing_dir: Path) -> tuple[str, dict[str, Any]]:
    """(MODEL_DIR, the parameters the real `fidellm serve` command parses from `args`). MODEL_DIR must come
    first; it is swapped for `existing_dir` because click checks that it exists. An unknown flag or a
    value of the wrong type raises click.UsageError."""
    model_dir, *flags = args
    assert not model_dir.startswith("-"), f"MODEL_DIR must be the first argument: {args}"
    context = serve_command.make_context("fidellm serve", [str(existing_dir), *flags])
    return model_dir, context.params


def serve_params(where: str, args: list[str], existing_dir: Path) -> tuple[str, dict[str, Any]]:
    """parse_serve_args, failing the test with `where` and click's own message."""
    try:
        return parse_serve_args(args, existing_dir)
    except click.UsageError as error:
        pytest.fail(f"{where}: `fidellm serve {' '.join(args)}` is refused: {error.format_message()}")


def nginx_directives(text: str) -> list[tuple[str, list[str]]]:
    """(name, arguments) of every simple directive in an nginx config, comments removed."""
    text = re.sub(r"#[^\n]*", "", text)
    return [(name, values.split()) for name, values in re.findall(r"(\w+)([^;{}]*);", text)]


def nginx_size(value: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([kKmMgG]?)", value).groups()
    return int(number) * NGINX_SIZE_UNITS[unit.lower()]


def nginx_seconds(value: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(ms|s|m|h|d|)", value).groups()
    return int(number) * NGINX_TIME_UNITS[unit]


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) per instruction, continuation lines joined and comments dropped."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
        for line in joined.splitlines()
        if line.strip()
    ]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def replicas(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services built from the repository's Dockerfile: the model-server replicas."""
    found = {
        name: service
        for name, service in compose["services"].items()
        if isinstance(service.get("build"), dict)
        and (
            DEPLOY / service["build"]["context"] / service["build"].get("dockerfile", "Dockerfile")
        ).resolve()
        == ROOT / "Dockerfile"
    }
    assert len(found) == REPLICAS, f"expected {REPLICAS} model-server replicas, found {sorted(found)}"
    return found


@pytest.fixture(scope="module")
def replica_params(replicas: dict[str, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Each replica's parsed `fidellm serve` parameters, with its MODEL_DIR under "model_dir"."""
    existing = tmp_path_factory.mktemp("model")
    parsed = {}
    for name, service in replicas.items():
        args = [interpolate(arg) for arg in service["command"]]
        model_dir, params = serve_params(f"deploy/compose.yaml, service {name}", args, existing)
        parsed[name] = {**params, "model_dir": model_dir}
    return parsed


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return dockerfile_instructions((ROOT / "Dockerfile").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def app_paths() -> set[tuple[str, str]]:
    """(method, path) of every route of the real app (a tiny random model: only the routes matter)."""
    app = create_app(random_llama(gqa_config(vocab_size=256)), ByteTokenizer(), ServeSettings(model_name="x"))
    return {
        (method, route.path)
        for route in app.routes
        if isinstance(route, APIRoute)
        for method in route.methods
    }


def mounted_file(service: dict[str, Any], target_dir: str) -> Path:
    """The host file a service mounts into `target_dir` (short volume syntax), relative to deploy/."""
    for volume in service.get("volumes", []):
        if isinstance(volume, str) and volume.split(":")[1].startswith(target_dir):
            return DEPLOY / volume.split(":")[0]
    raise AssertionError(f"no volume mounted under {target_dir}: {service.get('volumes')}")


def test_a_flag_typo_is_caught(tmp_path: Path) -> None:
    """The flag check this file relies on refuses what `fidellm serve` would refuse."""
    assert parse_serve_args(["/models/m", "--redis", "redis://r:6379/0"], tmp_path)[1]["redis_url"]
    with pytest.raises(click.NoSuchOption):
        parse_serve_args(["/models/m", "--redis-url", "redis://r:6379/0"], tmp_path)
    with pytest.raises(click.BadParameter):
        parse_serve_args(["/models/m", "--port", "eighty"], tmp_path)
    assert interpolate("${NAME:-fidel}") == "fidel" and interpolate("${KEY:?set it}") == "stand-in-key"


def test_replicas_serve_one_model_with_shared_redis(
    compose: dict[str, Any], replicas: dict[str, dict[str, Any]], replica_params: dict[str, dict[str, Any]]
) -> None:
    services = compose["services"]
    declared_envvars = {param.envvar for param in serve_command.params if getattr(param, "envvar", None)}
    for name, service in replicas.items():
        params = replica_params[name]
        assert params["host"] == "0.0.0.0", f"{name} must listen on every interface of its container"
        redis_host = re.fullmatch(r"redis://([\w.-]+):(\d+)/\d+", params["redis_url"] or "")
        assert redis_host and redis_host.group(1) in services, f"{name}: --redis must name a service"
        assert services[redis_host.group(1)]["image"].startswith(("redis", "valkey"))
        assert params["rpm"] > 0 and params["cache_size"] > 0, f"{name}: Redis shares the cache and limits"
        for variable in service.get("environment", {}):
            assert variable in declared_envvars, f"{name}: {variable} is read by no `fidellm serve` option"
        mounts = [v for v in service["volumes"] if isinstance(v, dict) and v["target"] == params["model_dir"]]
        assert mounts and mounts[0]["read_only"] is True, f"{name}: MODEL_DIR must be mounted read-only"
        assert service["depends_on"][redis_host.group(1)]["condition"] == "service_healthy"
    assert len({json.dumps(params, sort_keys=True, default=str) for params in replica_params.values()}) == 1


def test_prometheus_scrapes_every_replica(
    compose: dict[str, Any], replica_params: dict[str, dict[str, Any]], app_paths: set[tuple[str, str]]
) -> None:
    prometheus = next(s for s in compose["services"].values() if "prometheus" in s.get("image", ""))
    config = yaml.safe_load(mounted_file(prometheus, "/etc/prometheus").read_text(encoding="utf-8"))
    (job,) = config["scrape_configs"]
    targets = {target for group in job["static_configs"] for target in group["targets"]}
    assert targets == {f"{name}:{params['port']}" for name, params in replica_params.items()}
    assert ("GET", job.get("metrics_path", "/metrics")) in app_paths


def test_nginx_balances_the_replicas_and_streams(
    compose: dict[str, Any], replica_params: dict[str, dict[str, Any]], app_paths: set[tuple[str, str]]
) -> None:
    nginx = next(s for s in compose["services"].values() if "nginx" in s.get("image", ""))
    text = mounted_file(nginx, "/etc/nginx/nginx.conf").read_text(encoding="utf-8")
    (upstream, body), *others = re.findall(r"upstream\s+(\w+)\s*\{([^}]*)\}", re.sub(r"#[^\n]*", "", text))
    assert not others, "one upstream: the model-server replicas"
    servers = {args[0] for name, args in nginx_directives(body) if name == "server"}
    assert servers == {f"{name}:{params['port']}" for name, params in replica_params.items()}
    directives: dict[str, list[str]] = {}
    for name, args in nginx_directives(text):
        directives.setdefault(name, args)
    assert directives["proxy_pass"] == [f"http://{upstream}"]
    assert directives["proxy_buffering"] == ["off"], "server-sent events must not be buffered"
    assert directives["proxy_http_version"] == ["1.1"]
    params = next(iter(replica_params.values()))
    assert nginx_size(directives["client_max_body_size"][0]) >= params["max_body_mb"] * 1024**2
    assert nginx_seconds(directives["proxy_read_timeout"][0]) >= params["timeout_s"]
    assert set(nginx["depends_on"]) == set(replica_params)
    assert ("POST", "/v1/chat/completions") in app_paths


def test_dockerfile_runs_the_server_unprivileged_with_a_health_check(
    dockerfile: list[tuple[str, str]],
    replica_params: dict[str, dict[str, Any]],
    app_paths: set[tuple[str, str]],
    tmp_path: Path,
) -> None:
    instructions = dict(dockerfile)  # the last of each kind is the one in force
    assert instructions["FROM"].startswith("python:3.12-slim")
    assert json.loads(instructions["ENTRYPOINT"]) == ["fidellm", "serve"]
    model_dir, params = serve_params("Dockerfile CMD", json.loads(instructions["CMD"]), tmp_path)
    assert model_dir.startswith("/models/") and params["host"] == "0.0.0.0"
    assert instructions["USER"] not in ("root", "0")
    torch_installs = [rest for kind, rest in dockerfile if kind == "RUN" and "torch==" in rest]
    assert torch_installs and "download.pytorch.org/whl/cpu" in torch_installs[0]
    package_install = next(
        i for i, (kind, rest) in enumerate(dockerfile) if kind == "RUN" and "install ." in rest
    )
    assert dockerfile.index(("RUN", torch_installs[0])) < package_install, "the CPU torch must come first"
    health = re.search(r"http://127\.0\.0\.1:(\d+)(/\w+)", instructions["HEALTHCHECK"])
    assert health and int(health.group(1)) == params["port"] and ("GET", health.group(2)) in app_paths
    assert all(p["model_dir"] == model_dir and p["port"] == params["port"] for p in replica_params.values())


def test_dockerignore_keeps_runs_venvs_and_caches_out(dockerfile: list[tuple[str, str]]) -> None:
    patterns = [
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for excluded in ("runs", ".venv*", "data", ".pytest_cache", ".ruff_cache", ".hypothesis", ".git"):
        assert excluded in patterns, f".dockerignore should exclude {excluded}"
    copied = [part for kind, rest in dockerfile if kind == "COPY" for part in rest.split()[:-1]]
    assert copied, "the Dockerfile copies the package sources"
    for source in copied:
        assert Path(source).parts[0] not in patterns, f".dockerignore excludes {source}, which COPY needs"
