"""Decoding paths of `mipo_lib.generate` side by side on the cpu preset's model (issue 28, item 4): today's dynamic
KV cache vs transformers' static cache, with and without `torch.compile` of the decode step, and continuous batching
(`generate_batch`), on the same prompts; plus how many bf16 greedy replies move with the batch they are decoded in.

    python benchmarks/generation_paths.py --dtype float32                 # pair and evaluation shapes, every path
    python benchmarks/generation_paths.py --dtype bfloat16 --invariance   # bf16 batch-composition check only

Shapes: pairs are one batch of `--pair-prompts` train prompts sampled with the preset's temperature, top_p,
max_new_tokens and seed plan (a real run: 60 prompts x 2 stages x 3 seeds); evaluation is greedy decoding of
`--eval-prompts` validation prompts with the preset's cap, two-stage split and n-gram rule (a real run: 100 prompts x
methods x seeds). Every path is run twice on the same prompts: the first call carries the compile/warm-up cost, the
second is the steady state. Outputs are compared token for token with the dynamic-cache path.
Timings are process CPU seconds with `--threads` torch threads (default 1) on a shared machine: compare paths within
one run, not across runs.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from mipo_lib.config import get_preset  # noqa: E402
from mipo_lib.generate import GenerationStats, chat_prompt_ids, generate_token_batches  # noqa: E402
from mipo_lib.models import load_for_preset  # noqa: E402
from mipo_lib.tasks import get_task  # noqa: E402


def _static(model: Any, compiled: bool) -> Callable[..., Any]:
    """`model.generate` with a static KV cache (and, when `compiled`, transformers' auto-compile of the forward,
    which by default only happens on GPUs)."""
    from transformers import CompileConfig

    kwargs: dict[str, Any] = {"cache_implementation": "static"}
    if compiled:
        config = CompileConfig(mode="default")
        config._compile_all_devices = True
        kwargs["compile_config"] = config
    else:
        kwargs["disable_compile"] = True
    return functools.partial(type(model).generate, model, **kwargs)


def run_path(model: Any, tok: Any, ids: list[list[int]], path: str, **kw: Any) -> tuple[list[list[int]], GenerationStats, float]:
    """Token ids per prompt, the generation stats and the process CPU seconds of one pass of `generate_token_batches`
    (CPU time, not wall time: the machine is shared, and CPU time is what the path costs)."""
    if path != "dynamic":
        model.generate = _static(model, compiled=path == "static+compile")
    stats = GenerationStats()
    out: list[list[int]] = [[] for _ in ids]
    start = time.process_time()
    try:
        for batch, rows in generate_token_batches(model, tok, ids, stats=stats, progress=False, **kw):
            for r, row in zip(batch.rows, rows):
                out[r] = row
    finally:
        model.__dict__.pop("generate", None)
    return out, stats, time.process_time() - start


def run_continuous(model: Any, tok: Any, ids: list[list[int]], max_new_tokens: int) -> tuple[list[list[int]], float]:
    """Greedy decoding with transformers' continuous batching (no n-gram rule, no split: it takes neither)."""
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=model.generation_config.eos_token_id,
                              pad_token_id=tok.pad_token_id)
    start = time.process_time()
    with torch.inference_mode():
        res = model.generate_batch(ids, generation_config=config, max_new_tokens=max_new_tokens)
    seconds = time.process_time() - start
    by_id = {r.request_id: r for r in res.values()}
    keys = sorted(by_id, key=lambda k: int(k.rsplit("_", 1)[-1]))
    return [list(by_id[k].generated_tokens) for k in keys], seconds


def compare(name: str, model: Any, tok: Any, ids: list[list[int]], paths: list[str], **kw: Any) -> None:
    ref = None
    for path in paths:
        for attempt in ("first", "second"):
            try:
                out, stats, wall = run_path(model, tok, ids, path, **kw)
            except Exception as err:  # a path that does not run here is a result too
                print(f"{name} | {path} | {attempt} | failed: {type(err).__name__}: {str(err)[:160]}", flush=True)
                break
            ref = out if ref is None else ref
            same = sum(a == b for a, b in zip(out, ref))
            print(f"{name} | {path} | {attempt} | {wall:.1f} s CPU | {stats.new_tokens} tokens | "
                  f"{stats.new_tokens / wall:.1f} tok/s | identical to dynamic: {same}/{len(ids)}", flush=True)


def invariance(model: Any, tok: Any, ids: list[list[int]], preset: Any) -> None:
    """Greedy replies of each prompt decoded in the preset's batch plan vs in batches of 7 vs alone-ish (batch 1 is
    the padding-free extreme): the share that changes is what a different batch plan moves in this dtype."""
    kw = dict(max_new_tokens=preset.eval_max_new_tokens, temperature=0.0, no_repeat_ngram_size=preset.eval_no_repeat_ngram,
              batch_new_tokens=preset.eval_batch_new_tokens)
    base, _, _ = run_path(model, tok, ids, "dynamic", batch_size=preset.eval_batch_size, **kw)
    for size in (7, 1):
        other, _, _ = run_path(model, tok, ids, "dynamic", batch_size=size, **kw)
        moved = sum(a != b for a, b in zip(base, other))
        print(f"invariance | {preset.dtype} | batch {preset.eval_batch_size} vs batch {size} | {moved}/{len(ids)} greedy "
              f"replies differ ({moved / len(ids):.0%})", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--preset", default="cpu", help="whose model and shapes (smoke: the tests' check)")
    parser.add_argument("--pair-prompts", type=int, default=60)
    parser.add_argument("--eval-prompts", type=int, default=32)
    parser.add_argument("--paths", default="dynamic,static,static+compile")
    parser.add_argument("--continuous", action="store_true", help="also try transformers' generate_batch (greedy)")
    parser.add_argument("--invariance", action="store_true", help="only the batch-composition check")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time is not inflated by spinning)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    preset = get_preset(args.preset, dtype=args.dtype)
    model, tok = load_for_preset(preset)
    task = get_task(preset.task)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, dtype {args.dtype}", flush=True)
    eval_ids = [chat_prompt_ids(tok, task.prompt(e)) for e in task.examples("validation", args.eval_prompts)]
    if args.invariance:
        invariance(model, tok, eval_ids, preset)
        return 0
    paths = args.paths.split(",")
    pair_ids = [chat_prompt_ids(tok, task.prompt(e)) for e in task.examples("train", args.pair_prompts, seed=0)][: args.pair_prompts]
    compare("pairs", model, tok, pair_ids, paths, max_new_tokens=preset.max_new_tokens, temperature=preset.temperature,
            top_p=preset.top_p, batch_size=preset.gen_batch_size, seed=0)
    compare("eval", model, tok, eval_ids, paths, max_new_tokens=preset.eval_max_new_tokens, temperature=0.0,
            batch_size=preset.eval_batch_size, no_repeat_ngram_size=preset.eval_no_repeat_ngram,
            batch_new_tokens=preset.eval_batch_new_tokens)
    if args.continuous:
        plain, _, wall = run_path(model, tok, eval_ids, "dynamic", max_new_tokens=preset.eval_max_new_tokens,
                                  temperature=0.0, batch_size=preset.eval_batch_size)
        print(f"eval-plain | dynamic | {wall:.1f} s CPU | {sum(map(len, plain))} tokens (greedy, no n-gram rule, no split)", flush=True)
        for attempt in ("first", "second"):
            try:
                cb, seconds = run_continuous(model, tok, eval_ids, preset.eval_max_new_tokens)
            except Exception as err:
                print(f"eval-plain | continuous | failed: {type(err).__name__}: {str(err)[:200]}", flush=True)
                break
            eos = {*(model.generation_config.eos_token_id if isinstance(model.generation_config.eos_token_id, list) else [model.generation_config.eos_token_id])}
            cb = [row[: next((i + 1 for i, t in enumerate(row) if t in eos), len(row))] for row in cb]
            same = sum(a == b for a, b in zip(cb, plain))
            print(f"eval-plain | continuous | {attempt} | {seconds:.1f} s CPU | {sum(map(len, cb))} tokens | "
                  f"identical to dynamic: {same}/{len(eval_ids)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
