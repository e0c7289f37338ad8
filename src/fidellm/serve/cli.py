"""`fidellm serve MODEL_DIR`: load a model and serve the OpenAI-compatible API with uvicorn."""

from __future__ import annotations

import errno
import math
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import click

from fidellm.errors import FidelError

if TYPE_CHECKING:
    from fidellm.serve.cache import ResponseCache
    from fidellm.serve.ratelimit import RateLimiter


@click.command("serve")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--model-name", default=None, help="Name clients use in 'model' [default: MODEL_DIR's name].")
@click.option(
    "--max-tokens-cap",
    default=1024,
    show_default=True,
    type=click.IntRange(min=1),
    help="Largest max_tokens a request may ask for (also the default).",
)
@click.option(
    "--queue",
    "queue_size",
    default=64,
    show_default=True,
    type=click.IntRange(min=1),
    help="Requests that may wait for the model; more get 503.",
)
@click.option(
    "--max-batch",
    default=16,
    show_default=True,
    type=click.IntRange(min=1),
    help="Sequences decoded together (continuous batching); more wait in the queue.",
)
@click.option(
    "--prefill-chunk",
    default=512,
    show_default=True,
    type=click.IntRange(min=0),
    help="Prompt tokens fed per engine step while other requests decode (chunked prefill: a long prompt"
    " delays their next token by one chunk, not by its whole prefill); 0 = whole prompts at once.",
)
@click.option(
    "--timeout",
    "timeout_s",
    default=600.0,
    show_default=True,
    type=click.FloatRange(min=1),
    help="Seconds a request may take, queueing included.",
)
@click.option(
    "--max-body-mb",
    default=4.0,
    show_default=True,
    type=click.FloatRange(min=0.001),
    help="Largest request body; bigger ones get 413.",
)
@click.option(
    "--api-key",
    "api_keys",
    multiple=True,
    envvar="FIDELLM_API_KEY",
    help="Require 'Authorization: Bearer KEY' (repeatable; also $FIDELLM_API_KEY).",
)
@click.option(
    "--cache-size",
    default=1024,
    show_default=True,
    type=click.IntRange(min=0),
    help="Responses of deterministic requests (temperature 0 or a seed) kept in memory; 0 = no cache.",
)
@click.option(
    "--redis",
    "redis_url",
    default=None,
    metavar="URL",
    help="Keep cache entries and rate-limit buckets in this Redis (redis://host:port/db) for replicas.",
)
@click.option(
    "--cache-ttl",
    default=3600,
    show_default=True,
    type=click.IntRange(min=1),
    help="Seconds a cache entry lives in Redis (with --redis).",
)
@click.option(
    "--rate-limit",
    "rpm",
    default=0.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Requests per minute per API key (per client address without keys); 0 = no limit.",
)
@click.option(
    "--burst",
    default=None,
    type=click.IntRange(min=1),
    help="Requests a key may make at once before the rate applies [default: one minute's worth].",
)
@click.option(
    "--forwarded-allow-ips",
    default="127.0.0.1",
    show_default=True,
    envvar="FORWARDED_ALLOW_IPS",
    help="Proxies (comma-separated IPs, or *) whose X-Forwarded-For names the client: rate limits without"
    " API keys then count per real client behind a load balancer.",
)
@click.option("--device", default="cpu", show_default=True, help="torch device for the model.")
def serve_command(
    model_dir: Path,
    host: str,
    port: int,
    model_name: str | None,
    max_tokens_cap: int,
    queue_size: int,
    max_batch: int,
    prefill_chunk: int,
    timeout_s: float,
    max_body_mb: float,
    api_keys: tuple[str, ...],
    cache_size: int,
    redis_url: str | None,
    cache_ttl: int,
    rpm: float,
    burst: int | None,
    forwarded_allow_ips: str,
    device: str,
) -> None:
    """Serve MODEL_DIR (an exported, checkpoint or run directory) as an OpenAI-compatible API:
    /v1/models, /v1/chat/completions, /v1/completions, /health, /metrics."""
    import uvicorn

    from fidellm.models.load import load_model
    from fidellm.serve.app import create_app
    from fidellm.serve.common import ServeSettings
    from fidellm.tokenizer.base import load_tokenizer
    from fidellm.train.distributed import pick_device

    torch_device = pick_device(device)
    with listening_socket(host, port) as sock:  # a bad address fails now, not after loading the model
        model, tokenizer_dir = load_model(model_dir, device=torch_device)
        if not tokenizer_dir.is_dir():
            raise FidelError(f"{tokenizer_dir}: no tokenizer directory next to the model")
        settings = ServeSettings(
            model_name=model_name or model_dir.resolve().name,
            max_tokens_cap=max_tokens_cap,
            queue_size=queue_size,
            max_batch=max_batch,
            prefill_chunk=prefill_chunk,
            api_keys=tuple(api_keys),
            request_timeout_s=timeout_s,
            max_body_bytes=int(max_body_mb * 1024 * 1024),
        )
        cache, limiter = cache_and_limiter(cache_size, redis_url, cache_ttl, rpm, burst)
        app = create_app(model, load_tokenizer(tokenizer_dir), settings, cache=cache, limiter=limiter)
        click.echo(f"serving {settings.model_name} on http://{host}:{port}/v1", err=True)
        config = uvicorn.Config(
            app, host=host, port=port, log_level="info", forwarded_allow_ips=forwarded_allow_ips
        )
        uvicorn.Server(config).run(sockets=[sock])


BIND_PROBLEMS = {
    errno.EADDRINUSE: "the port is already in use (another server? choose one with --port)",
    errno.EADDRNOTAVAIL: "the host is not an address of this machine",
    errno.EACCES: "permission denied (ports below 1024 need privileges)",
}


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port for uvicorn (IPv6 when the host has a ':', as uvicorn does); an
    address that does not resolve or cannot be bound is a FidelError naming host and port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    where = f"cannot listen on {host}:{port}"
    try:
        (family, kind, proto, _, address), *_ = socket.getaddrinfo(
            host, port, family, socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (OSError, UnicodeError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        problem = f"--host {host!r} is not an IP address or a name that resolves ({reason})"
        raise FidelError(f"{where}: {problem}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as error:
        sock.close()
        raise FidelError(f"{where}: {BIND_PROBLEMS.get(error.errno) or error.strerror or error}") from None
    return sock


def cache_and_limiter(
    cache_size: int, redis_url: str | None, cache_ttl: int, rpm: float, burst: int | None
) -> tuple[ResponseCache | None, RateLimiter | None]:
    """The response cache and rate limiter the options ask for; a Redis that does not answer is an error
    now rather than at the first request."""
    from fidellm.serve.cache import InProcessLRU, RedisCache
    from fidellm.serve.ratelimit import RedisTokenBucket, TokenBucket

    burst = burst or max(1, math.ceil(rpm))
    if redis_url is None:
        cache = InProcessLRU(cache_size) if cache_size else None
        return cache, TokenBucket(rpm, burst) if rpm else None
    import redis

    try:
        redis.Redis.from_url(redis_url, socket_connect_timeout=5).ping()
    except (redis.RedisError, ValueError) as error:
        raise FidelError(f"--redis {redis_url}: cannot reach Redis ({error})") from error
    cache = RedisCache(redis_url, cache_ttl) if cache_size else None
    return cache, RedisTokenBucket(redis_url, rpm, burst) if rpm else None
