"""Decode throughput of fdcore's torch runner vs transformers ``generate`` on SmolLM2-135M.

    python benchmarks/model_forward.py [--batches 1,4,16] [--prompt-len 64] [--new-tokens 32]
                                       [--threads N] [--repeats 3] [--clock wall|cpu]

Both sides run float32 on the same de-quantised GGUF weights, greedy, with prompts of equal
length (so transformers needs no padding). "tok/s" counts generated tokens per second of decode
steps only; for transformers that is ``generate(N) - generate(1)`` over ``N - 1`` steps. Each
figure is the best of ``--repeats`` runs. On a machine shared with other jobs, ``--clock cpu``
(process CPU time; use it with ``--threads 1``) is steadier than wall time.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from fdcore.engine.runner import SeqInput
from fdcore.engine.runners.torch import TorchRunner, load_model
from fdcore.engine.runners.torch.fetch import fetch_smollm2

Clock = Callable[[], float]


def fdcore_decode(
    runner: TorchRunner, batch: int, prompt_len: int, new_tokens: int, clock: Clock
) -> float:
    """Generated tokens per second over ``new_tokens`` batched decode steps."""
    blocks_per_seq = -(-(prompt_len + new_tokens) // runner.block_size)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(100, 40000, (batch, prompt_len), generator=gen).tolist()
    tables = [list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in range(batch)]
    logits = runner.forward([SeqInput(p, 0, t) for p, t in zip(prompts, tables, strict=True)])
    start = clock()
    for step in range(new_tokens):
        nxt = logits.argmax(-1).tolist()
        feeds = [SeqInput([n], prompt_len + step, t) for n, t in zip(nxt, tables, strict=True)]
        logits = runner.forward(feeds)
    return batch * new_tokens / (clock() - start)


def transformers_decode(
    model: torch.nn.Module, batch: int, prompt_len: int, new_tokens: int, clock: Clock
) -> float:
    """Generated tokens per second of ``generate``'s decode steps (prefill subtracted)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (batch, prompt_len), generator=gen)
    mask = torch.ones_like(ids)

    def run(n: int) -> float:
        start = clock()
        with torch.inference_mode():
            model.generate(  # type: ignore[operator]
                ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=model.config.eos_token_id,  # type: ignore[union-attr]
            )
        return clock() - start

    run(2)  # warm-up
    return batch * (new_tokens - 1) / (run(new_tokens) - run(1))


def main() -> None:
    """Print a table of decode tokens/s per batch size."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="GGUF path (default: fetch SmolLM2)")
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (both sides)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--skip-transformers", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock: Clock = time.perf_counter if args.clock == "wall" else time.process_time
    path = args.model or str(fetch_smollm2())
    batches = [int(b) for b in args.batches.split(",")]
    blocks = max(batches) * -(-(args.prompt_len + args.new_tokens) // 16)
    runner = load_model(path, max_model_len=blocks * 16, num_blocks=blocks).runner
    reference = None
    if not args.skip_transformers:
        from transformers import AutoModelForCausalLM

        directory, name = os.path.split(path)
        reference = AutoModelForCausalLM.from_pretrained(
            directory, gguf_file=name, dtype=torch.float32
        ).eval()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock")
    print(f"{'batch':>5} {'fdcore tok/s':>13} {'transformers tok/s':>19} {'ratio':>6}")
    for batch in batches:
        shape = (batch, args.prompt_len, args.new_tokens, clock)
        ours = max(fdcore_decode(runner, *shape) for _ in range(args.repeats))
        theirs = float("nan")
        if reference is not None:
            theirs = max(transformers_decode(reference, *shape) for _ in range(args.repeats))
        print(f"{batch:>5} {ours:>13.1f} {theirs:>19.1f} {ours / theirs:>6.2f}")


if __name__ == "__main__":
    main()
