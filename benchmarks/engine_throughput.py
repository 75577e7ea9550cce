"""Engine throughput and prefix-cache TTFT on SmolLM2-135M (CPU), in process.

Requests go through fdcore's engine loop exactly as the API submits them (Serving -> ``local``
scheduler -> batcher -> torch runner -> sampling), without HTTP. Side by side, transformers'
``generate`` runs the same weights (dequantized from the same GGUF) at the same batch sizes.

    .venv/bin/python benchmarks/engine_throughput.py [--tokens 64] [--batches 1,4,16]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path

import torch

from fdcore.engine.config import EngineConfig
from fdcore.engine.engine import Engine, build_engine
from fdcore.engine.loader import LoadedModel, load
from fdcore.engine.torch_thread import on_torch_thread
from fdcore.plugins import load_plugins
from fdcore.types import EngineRequest, SamplingParams, SchedulerContext

MODEL = Path(__file__).resolve().parents[1] / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
TOPICS = ["rivers", "castles", "volcanoes", "orchards", "comets", "harbours", "glaciers",
          "deserts", "forests", "bridges", "islands", "meadows", "canyons", "lighthouses",
          "vineyards", "reefs"]


@contextlib.asynccontextmanager
async def running(model: LoadedModel, config: EngineConfig) -> AsyncIterator[Engine]:
    """An engine behind a fresh ``local`` scheduler, started and stopped around the block."""
    component = load_plugins("default").registry.get("scheduler", "local")
    scheduler = component.cls(component.cls.Config.model_validate({}),
                              SchedulerContext("bench", "127.0.0.1", 0, config.block_size))
    engine = build_engine(config, model, scheduler, "127.0.0.1")
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


async def submit_all(engine: Engine, prompts: list[list[int]], max_tokens: int
                     ) -> tuple[float, int, list[float]]:
    """Submit every prompt at once; return (seconds, generated tokens, TTFT of each)."""
    start = time.perf_counter()

    async def one(i: int, ids: list[int]) -> tuple[int, float]:
        sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        request = EngineRequest(f"r{time.monotonic_ns()}-{i}", ids, sampling, time.time())
        ttft, tokens = 0.0, 0
        async for output in await engine.serving.submit(request):
            if output.token_ids and not ttft:
                ttft = time.perf_counter() - start
            tokens = output.completion_tokens
        return tokens, ttft

    results = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    return time.perf_counter() - start, sum(t for t, _ in results), [f for _, f in results]


def equal_prompts(model: LoadedModel, batch: int) -> list[list[int]]:
    """``batch`` distinct prompts cut to one token length (so transformers needs no padding)."""
    encoded = [model.tokenizer.encode(f"Write a short story about {TOPICS[i % 16]}, part {i}.")
               for i in range(batch)]
    length = min(len(e) for e in encoded)
    return [e[:length] for e in encoded]


async def fdcore_rates(model: LoadedModel, config: EngineConfig, batches: list[int],
                       tokens: int) -> dict[int, float]:
    """fdcore's generated tokens per second at each concurrency."""
    rates = {}
    async with running(model, config) as engine:
        await submit_all(engine, equal_prompts(model, 2), 4)  # warm-up
        for batch in batches:
            seconds, generated, _ = await submit_all(engine, equal_prompts(model, batch), tokens)
            rates[batch] = generated / seconds
    return rates


def transformers_rates(model: LoadedModel, batches: list[int], tokens: int) -> dict[int, float]:
    """transformers ``generate`` (greedy, KV cache on) on the same GGUF weights."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(MODEL.parent), gguf_file=MODEL.name,
                                              dtype=torch.float32).eval()
    rates = {}
    with torch.inference_mode():
        warm = torch.tensor(equal_prompts(model, 2))
        hf.generate(warm, attention_mask=torch.ones_like(warm), max_new_tokens=4,
                    do_sample=False, pad_token_id=model.eos_token_ids[0])
        for batch in batches:
            ids = torch.tensor(equal_prompts(model, batch))
            start = time.perf_counter()
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                              min_new_tokens=tokens, do_sample=False,
                              pad_token_id=model.eos_token_ids[0])
            rates[batch] = (out.shape[1] - ids.shape[1]) * batch / (time.perf_counter() - start)
    return rates


async def prefix_ttft(model: LoadedModel, config: EngineConfig, rounds: int
                      ) -> tuple[float, float, int, int]:
    """Median TTFT of a ~1000-token prompt: cold vs with its first 90% cached."""
    cold, warm = [], []
    async with running(model, config) as engine:
        await submit_all(engine, equal_prompts(model, 1), 1)  # warm-up
        for r in range(rounds):
            shared = model.tokenizer.encode(f"Round {r}. " + " ".join(
                f"Fact {i}: the {TOPICS[(i + r) % 16]} of region {i} are well documented."
                for i in range(70)))[:900]
            tail = [model.tokenizer.encode(f" Question {k}: summarise " + "the facts above " * 8)
                    [:100] for k in range(2)]
            _, _, [t_cold] = await submit_all(engine, [shared + tail[0]], 1)
            _, _, [t_warm] = await submit_all(engine, [shared + tail[1]], 1)
            cold.append(t_cold)
            warm.append(t_warm)
    return statistics.median(cold), statistics.median(warm), len(shared), len(shared) + 100


def main() -> None:
    """Run both measurements and print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64, help="generated tokens per request")
    parser.add_argument("--batches", default="1,4,16", help="concurrency levels")
    parser.add_argument("--rounds", type=int, default=3, help="TTFT rounds (median reported)")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    config = EngineConfig.model_validate({"model": str(MODEL), "block-size": 16,
                                          "num-gpu-blocks": 2048})
    # Both sides run on the engine's torch thread: one OpenMP team for the process (see
    # fdcore/engine/torch_thread.py), so neither pays for the other's idle team.
    model = on_torch_thread(load, config)
    print(f"load average before: {os.getloadavg()[0]:.2f}, torch threads: "
          f"{torch.get_num_threads()}")
    ours = asyncio.run(fdcore_rates(model, config, batches, args.tokens))
    theirs = on_torch_thread(transformers_rates, model, batches, args.tokens)
    print("| concurrent requests | fdcore tokens/s | transformers tokens/s |")
    print("|---|---|---|")
    for batch in batches:
        print(f"| {batch} | {ours[batch]:.1f} | {theirs[batch]:.1f} |")
    scaling = ours[batches[-1]] / ours[batches[0]]
    print(f"fdcore scaling, {batches[-1]} vs {batches[0]} concurrent: {scaling:.2f}x")
    cold, warm, cached, total = asyncio.run(prefix_ttft(model, config, args.rounds))
    print(f"TTFT, {total}-token prompt: cold {cold * 1000:.1f} ms, first {cached} tokens cached "
          f"{warm * 1000:.1f} ms ({warm / cold:.0%} of cold)")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
