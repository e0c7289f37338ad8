"""Time of one scoring request to the server (lm-eval's loglikelihood: N prompts, echo, max_tokens 0,
logprobs 1), in process over ASGI; median of repeats in seconds, as a RESULTS.md row.

Usage: python benchmarks/bench_serve_scoring.py MODEL [--prompts 200] [--repeats 5]
MODEL: anything `fidellm serve` loads (e.g. runs/demo); the prompts are the first N FLORES amh devtest
lines. Time an older commit with PYTHONPATH=OLD_CHECKOUT/src to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import httpx2
import torch
from common import markdown_row

from fidellm.models.load import load_model
from fidellm.paths import resolve_data_dir
from fidellm.serve.app import create_app
from fidellm.serve.common import ServeSettings
from fidellm.tokenizer.base import load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    model, tokenizer_dir = load_model(args.model)
    app = create_app(model.eval(), load_tokenizer(tokenizer_dir), ServeSettings(model_name="m"))
    path = resolve_data_dir() / "flores200" / "amh_Ethi.devtest"
    lines = path.read_text(encoding="utf-8").splitlines()[: args.prompts]
    request = {"model": "m", "prompt": lines, "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0}

    async def timed() -> list[float]:
        seconds = []
        transport = httpx2.ASGITransport(app=app)
        async with httpx2.AsyncClient(transport=transport, base_url="http://serve", timeout=600) as client:
            for _ in range(args.repeats + 1):  # the first warms up
                started = time.perf_counter()
                reply = await client.post("/v1/completions", json=request)
                seconds.append(time.perf_counter() - started)
                reply.raise_for_status()
                assert len(reply.json()["choices"]) == len(lines)
        return seconds[1:]

    seconds = asyncio.run(timed())
    command = f"python benchmarks/bench_serve_scoring.py {args.model} --prompts {args.prompts}"
    command += f" --repeats {args.repeats}"
    what = (
        f"scoring request, {len(lines)} FLORES prompts (echo, logprobs 1), {torch.get_num_threads()} threads"
    )
    print(markdown_row(what, command, seconds, "s"))


if __name__ == "__main__":
    main()
