"""Benchmark of the pipeline's hot paths, side by side in one run (ratios, not absolute times).

    python benchmarks/run.py            # the cpu preset's model (SmolLM2-135M), writes benchmarks/results.md
    python benchmarks/run.py --smoke    # tiny random model, seconds; CI runs this so the script cannot rot
    python benchmarks/run.py --dtype float32   # as on a CPU without native bf16 (the reference runs' precision)

Measured:
1. generation: tokens/s of the library's batched, length-sorted generation vs naive one-prompt-at-a-time
   `generate` (same prompts, same sampling settings), and vs teacher-forced scoring of the same tokens (the roof);
2. scoring: base-model log-prob tokens/s, batched and length-sorted;
3. DPO: one epoch with reference log-probs reused from the pairs vs TRL's default (a reference forward every step,
   adapter disabled), peak memory of both, and whether a second copy of the base weights exists; one step with the
   fused LM head on every position vs the reply positions only vs also each prompt run once, against the machine's
   matmul roof;
4. 4-bit NF4 vs the default dtype: load footprint and one training step;
5. end to end: wall time and peak memory per notebook from the runner's timings.csv, when a cpu run exists.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from mipo_lib import dpo, shared_prompt  # noqa: E402
from mipo_lib.config import get_preset, run_dir  # noqa: E402
from mipo_lib.workbook.environment import versions  # noqa: E402
from mipo_lib.generate import GenerationStats, chat_prompt_ids, generate_batches, generate_reply_batches  # noqa: E402
from mipo_lib.models import is_4bit, load_for_preset, memory_footprint_mb  # noqa: E402
from mipo_lib.pairs import build_pairs  # noqa: E402
from mipo_lib.workbook.runner import PeakMemory  # noqa: E402
from mipo_lib.scoring import sequence_logprobs  # noqa: E402
from mipo_lib.tasks import get_task  # noqa: E402

GOALS = {"generation_vs_naive": (">=", 8.0), "generation_vs_scoring": (">=", 0.30), "dpo_precomputed_vs_default": ("<=", 0.70)}


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def bench_generation(preset: Any, n_prompts: int) -> dict[str, float]:
    """Batched vs naive generation and the scoring roof, over the same prompts and sampling settings."""
    model, tok = load_for_preset(preset)
    task = get_task(preset.task)
    prompts = [task.prompt(e) for e in task.examples("train", n_prompts, seed=0)][:n_prompts]
    ids = [chat_prompt_ids(tok, p) for p in prompts]
    kw = dict(max_new_tokens=preset.max_new_tokens, temperature=preset.temperature, top_p=preset.top_p, seed=0, progress=False)

    batched = GenerationStats()
    texts: list[str] = [""] * len(ids)
    for batch, out in generate_batches(model, tok, ids, batch_size=preset.gen_batch_size, stats=batched, **kw):
        for r, t in zip(batch.rows, out):
            texts[r] = t
    naive_n = max(2, len(ids) // 4)  # the naive loop is slow: time a quarter of the prompts, compare rates
    naive = GenerationStats()
    for b in range(naive_n):
        for _ in generate_batches(model, tok, [ids[b]], batch_size=1, stats=naive, **kw):
            pass
    (_, n_tok), score_s = timed(lambda: sequence_logprobs(model, tok, prompts, texts, batch_size=preset.score_batch_size))
    scoring_tps = float(n_tok.sum()) / score_s
    return {
        "generation_batched_tokens_per_s": batched.tokens_per_s,
        "generation_naive_tokens_per_s": naive.tokens_per_s,
        "scoring_tokens_per_s": scoring_tps,
        "generation_vs_naive": batched.tokens_per_s / naive.tokens_per_s,
        "generation_vs_scoring": batched.tokens_per_s / scoring_tps,
    }


def bench_evaluation(preset: Any, n_prompts: int) -> dict[str, float]:
    """Greedy evaluation (the preset's batch size, cap and n-gram rule) of validation prompts with context, decoded in
    one go per batch vs in two stages (`eval_batch_new_tokens`: only unfinished replies decode past it)."""
    from mipo_lib import evaluate

    model, tok = load_for_preset(preset)
    task = get_task(preset.task)
    examples = task.examples("validation", n_prompts)
    out: dict[str, float] = {}
    texts = {}
    for name, split in (("one_go", 0), ("split", preset.eval_batch_new_tokens)):
        (replies, cut), seconds = timed(lambda: evaluate.generate_replies(
            model, tok, task, examples, preset.with_overrides(eval_batch_new_tokens=split), progress=False))
        texts[name] = replies
        out[f"eval_{name}_s"] = seconds
    n_tokens = sum(len(tok.encode(t, add_special_tokens=False)) for t in texts["one_go"])
    out.update({
        "eval_prompts": float(len(examples)),
        "eval_split_vs_one_go": out["eval_split_s"] / out["eval_one_go_s"],
        "eval_split_same_replies": float(sum(a == b for a, b in zip(texts["one_go"], texts["split"])) / len(examples)),
        "eval_truncated": float(sum(cut) / len(examples)),
        "eval_split_tokens_per_s": n_tokens / out["eval_split_s"],
    })
    return out


def bench_distinct_prompts(preset: Any, n_prompts: int) -> dict[str, float]:
    """The base model's evaluation (no context, so the preferences of a request share one prompt): each distinct
    prompt decoded once (`evaluate.generate_replies`) vs every row decoded; the replies must be the same."""
    from mipo_lib import evaluate

    model, tok = load_for_preset(preset)
    task = get_task(preset.task)
    examples = task.examples("validation", n_prompts)
    ids = [chat_prompt_ids(tok, task.prompt(e, with_context=False)) for e in examples]
    (distinct, _), distinct_s = timed(lambda: evaluate.generate_replies(
        model, tok, task, examples, preset, with_context=False, progress=False))
    every = [""] * len(ids)

    def every_row() -> None:
        for batch, replies, _ in generate_reply_batches(
            model, tok, ids, max_new_tokens=preset.eval_max_new_tokens, temperature=0.0,
            batch_size=preset.eval_batch_size, progress=False, no_repeat_ngram_size=preset.eval_no_repeat_ngram,
            batch_new_tokens=preset.eval_batch_new_tokens,
        ):
            for row, text in zip(batch.rows, replies):
                every[row] = text

    _, every_s = timed(every_row)
    return {
        "eval_no_context_distinct_prompts": float(len({tuple(i) for i in ids})),
        "eval_no_context_every_row_s": every_s,
        "eval_no_context_distinct_s": distinct_s,
        "eval_no_context_distinct_vs_every_row": distinct_s / every_s,
        "eval_no_context_same_replies": float(sum(a == b for a, b in zip(distinct, every)) / len(ids)),
    }


def _dpo_epoch(preset: Any, pairs: list[dict[str, Any]], reuse: bool, load_in_4bit: bool = False) -> dict[str, Any]:
    model, tok = load_for_preset(preset, load_in_4bit=load_in_4bit)
    with tempfile.TemporaryDirectory() as tmp, PeakMemory() as mem:
        res, seconds = timed(lambda: dpo.train_dpo(model, tok, pairs, preset, 0, Path(tmp), reuse_reference=reuse, redo=True, progress=False))
    return {"seconds": res.seconds, "wall_s": seconds, "peak_rss_mb": mem.peak / 2**20, "steps": len(res.log), "model": model}


def bench_dpo(preset: Any) -> dict[str, float]:
    """One epoch with reference log-probs from the pairs vs TRL's reference forward every step."""
    model, tok = load_for_preset(preset)
    pairs = build_pairs(model, tok, get_task(preset.task), preset, seed=0, progress=False)
    del model
    one_epoch = preset.with_overrides(epochs=1)
    step = bench_dpo_step(one_epoch, pairs)
    reuse = _dpo_epoch(one_epoch, pairs, reuse=True)
    default = _dpo_epoch(one_epoch, pairs, reuse=False)
    q4 = _dpo_epoch(one_epoch, pairs[: 2 * one_epoch.batch_size], reuse=True, load_in_4bit=True)
    plain = _dpo_epoch(one_epoch, pairs[: 2 * one_epoch.batch_size], reuse=True)
    m16, _ = load_for_preset(preset)
    m4, _ = load_for_preset(preset, load_in_4bit=True)
    return {
        "dpo_epoch_reused_reference_s": reuse["seconds"],
        "dpo_epoch_trl_default_s": default["seconds"],
        "dpo_precomputed_vs_default": reuse["seconds"] / default["seconds"],
        "dpo_peak_rss_reused_mb": reuse["peak_rss_mb"],
        "dpo_peak_rss_default_mb": default["peak_rss_mb"],
        "dpo_steps_per_epoch": reuse["steps"],
        "base_weight_copies": 1.0,  # asserted below: TRL keeps no ref_model with a PEFT adapter
        "footprint_default_mb": memory_footprint_mb(m16),
        "footprint_4bit_mb": memory_footprint_mb(m4),
        "is_4bit": float(is_4bit(m4)),
        "step_time_4bit_vs_default": (q4["seconds"] / q4["steps"]) / (plain["seconds"] / plain["steps"]),
        **step,
    }


def _step_trainer(preset: Any, pairs: list[dict[str, Any]], tmp: Path) -> tuple[Any, list[dict[str, Any]]]:
    model, tok = load_for_preset(preset)
    DPOConfig, Trainer, _, _ = dpo._trainer_classes()
    args = DPOConfig(**dpo.dpo_config_kwargs(preset, 0, tmp, model, progress=False, n_rows=len(pairs)))
    trainer = Trainer(model=model, args=args, train_dataset=dpo.dpo_dataset(pairs), processing_class=tok, peft_config=dpo.lora_config(preset))
    dpo._prepare(trainer, False)
    return trainer, [b for _, b in zip(range(4), trainer.get_train_dataloader())]


def _step_seconds(trainer: Any, batches: list[dict[str, Any]]) -> float:
    """Mean seconds of a forward + backward (the optimizer's update is negligible next to them) over batches 2..n."""
    def step(batch: dict[str, Any]) -> None:
        trainer.compute_loss(trainer.model, batch).backward()

    trainer.model.train()
    step(batches[0])  # warm-up: allocator, first-call overheads
    start = time.perf_counter()
    for batch in batches[1:]:
        step(batch)
    return (time.perf_counter() - start) / (len(batches) - 1)


def _sgemm_gflops(n: int = 1024, k: int = 576, m: int = 1536, reps: int = 20) -> float:
    """This machine's matmul roof in the model's shapes (tokens x hidden x MLP width), in GFLOP/s."""
    a, b = torch.randn(n, k), torch.randn(k, m)
    a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n * k * m * reps / (time.perf_counter() - start) / 1e9


def _body_tokens(batch: dict[str, Any], shared: bool) -> int:
    """Tokens a step pushes through the transformer body: the padded batch, or with each prompt run once the n
    padded prompts plus the 2n padded replies."""
    layout = shared_prompt.pair_layout(batch["input_ids"], batch["attention_mask"], batch["completion_mask"]) if shared else None
    if layout is None:
        return batch["input_ids"].numel()
    prompt_len, reply_len = layout
    n = len(prompt_len) // 2
    return n * int(prompt_len.max()) + 2 * n * int(reply_len.max())


def bench_dpo_step(preset: Any, pairs: list[dict[str, Any]]) -> dict[str, float]:
    """One DPO step (forward + backward) three ways: TRL's layout with its fused LM head on every position (TRL's CPU
    default); the same with only the labelled reply positions scored (`dpo.compact_lm_head_on_cpu`); and the
    library's step, which also runs each pair's prompt once (`shared_prompt`). The library's step's FLOP rate is
    compared with this machine's matmul roof. FLOPs of a LoRA step: forward 2 x body params x body tokens, backward the
    same again (frozen weights get no gradient), and the LM head on the labelled positions (projection, recomputed in
    the backward, and its gradient: 3 x 2 x vocab x hidden each)."""
    import trl.trainer.utils as trl_utils

    compacting = trl_utils._use_triton
    uncompacted = getattr(compacting, "trl_predicate", compacting)
    with tempfile.TemporaryDirectory() as tmp:
        trainer, batches = _step_trainer(preset, pairs, Path(tmp))
        shared = _step_seconds(trainer, batches)
        type(trainer).share_prompt = False
        compact = _step_seconds(trainer, batches)
        trl_utils._use_triton = uncompacted
        try:
            full = _step_seconds(trainer, batches)
        finally:
            trl_utils._use_triton = compacting
    config = trainer.model.config
    vocab, hidden = config.vocab_size, config.hidden_size
    body = sum(p.numel() for n, p in trainer.model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)
    measured = batches[1:]
    tokens = sum(_body_tokens(b, shared=False) for b in measured) / len(measured)
    shared_tokens = sum(_body_tokens(b, shared=True) for b in measured) / len(measured)
    labelled = sum(int(b["completion_mask"][:, 1:].sum()) for b in measured) / len(measured)
    flops = 4 * body * shared_tokens + 6 * vocab * hidden * labelled
    roof = _sgemm_gflops()
    return {
        "dpo_step_all_positions_s": full,
        "dpo_step_compact_s": compact,
        "dpo_step_compact_vs_all": compact / full,
        "dpo_step_shared_prompt_s": shared,
        "dpo_step_shared_vs_compact": shared / compact,
        "dpo_step_padded_tokens": tokens,
        "dpo_step_shared_prompt_tokens": shared_tokens,
        "dpo_step_labelled_tokens": labelled,
        "dpo_step_gflops": flops / shared / 1e9,
        "sgemm_gflops": roof,
        "dpo_step_vs_sgemm_roof": flops / shared / 1e9 / roof,
    }


def single_weight_copy(preset: Any) -> bool:
    """True when the DPO trainer holds no separate reference model (the adapter is disabled instead)."""
    model, tok = load_for_preset(preset)
    pairs = build_pairs(model, tok, get_task(preset.task), preset, seed=0, progress=False)
    DPOConfig, Trainer, _, _ = dpo._trainer_classes()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(model=model, args=DPOConfig(**dpo.dpo_config_kwargs(preset, 0, Path(tmp), model, progress=False)),
                          train_dataset=dpo.dpo_dataset(pairs), processing_class=tok, peft_config=dpo.lora_config(preset))
        return trainer.ref_model is None


def analysis(results: dict[str, float]) -> list[str]:
    """Why a goal is met or missed, computed from the same run's numbers."""
    roof = results["scoring_tokens_per_s"] / results["generation_naive_tokens_per_s"]
    return [
        f"- Generation: teacher-forced scoring runs at {results['scoring_tokens_per_s']:.0f} tokens/s, one-prompt-at-a-time "
        f"decoding at {results['generation_naive_tokens_per_s']:.0f}, so batching can at most reach about {roof:.1f}x naive "
        f"on this machine; batched generation reaches {results['generation_vs_naive']:.1f}x, i.e. "
        f"{results['generation_vs_scoring']:.0%} of the scoring roof. On 2 cores the roof itself is low (the model is "
        "compute-bound from small batches on), which is what caps the ratio to naive; a GPU has far more compute per byte.",
        f"- DPO: with a frozen base and LoRA, a training step costs about one forward plus a backward of similar cost, and "
        f"TRL's default adds a reference forward: skipping it caps the ratio near 2/3. Measured "
        f"{results['dpo_precomputed_vs_default']:.2f}; the rest is per-step work both share (collation, optimizer, "
        f"logging). Peak memory {results['dpo_peak_rss_reused_mb']:.0f} vs {results['dpo_peak_rss_default_mb']:.0f} MB; "
        "one copy of the base weights (the trainer holds no reference model; asserted).",
        f"- DPO step: TRL's fused LM head scores every position on a CPU; scoring only the labelled reply positions "
        f"({results['dpo_step_labelled_tokens']:.0f} of {results['dpo_step_padded_tokens']:.0f} per batch) takes the "
        f"step from {results['dpo_step_all_positions_s']:.2f} s to {results['dpo_step_compact_s']:.2f} s "
        f"({results['dpo_step_compact_vs_all']:.2f}x). Running each pair's prompt once (both replies attend to its "
        f"cached keys and values) cuts the body's tokens from {results['dpo_step_padded_tokens']:.0f} to "
        f"{results['dpo_step_shared_prompt_tokens']:.0f} per batch and the step to {results['dpo_step_shared_prompt_s']:.2f} s "
        f"({results['dpo_step_shared_vs_compact']:.2f}x the compacted step). That step runs at "
        f"{results['dpo_step_gflops']:.0f} GFLOP/s, {results['dpo_step_vs_sgemm_roof']:.0%} of this machine's matmul "
        f"roof in the model's shapes ({results['sgemm_gflops']:.0f} GFLOP/s): what is left is the transformer body "
        "itself, the replies' padding, and attention over the cached prompt.",
        f"- Evaluation: greedy replies to {results['eval_prompts']:.0f} validation prompts take "
        f"{results['eval_one_go_s']:.0f} s when each batch decodes until its longest reply ends and "
        f"{results['eval_split_s']:.0f} s when replies still going after the first stage continue on their own "
        f"({results['eval_split_vs_one_go']:.2f}x; {results['eval_split_same_replies']:.0%} of replies identical, "
        f"{results['eval_truncated']:.0%} cut at the cap). The split run decodes "
        f"{results['eval_split_tokens_per_s']:.0f} reply tokens/s, "
        f"{results['eval_split_tokens_per_s'] / results['scoring_tokens_per_s']:.0%} of the scoring roof: a decode step "
        "still runs the whole model for one token per row.",
        f"- Evaluation without context (the base model): the {results['eval_prompts']:.0f} prompts are "
        f"{results['eval_no_context_distinct_prompts']:.0f} distinct ones (a request's preferences share its prompt); "
        f"decoding each once takes {results['eval_no_context_distinct_s']:.0f} s instead of "
        f"{results['eval_no_context_every_row_s']:.0f} s for every row "
        f"({results['eval_no_context_distinct_vs_every_row']:.2f}x; "
        f"{results['eval_no_context_same_replies']:.0%} of replies identical).",
        f"- 4-bit NF4: {results['footprint_4bit_mb']:.0f} MB vs {results['footprint_default_mb']:.0f} MB of weights; "
        f"a training step takes {results['step_time_4bit_vs_default']:.2f}x the default-precision step on this CPU. 4-bit "
        "exists to fit GPUs (a T4), not to speed up a CPU.",
    ]


def end_to_end(preset_name: str) -> list[str]:
    path = run_dir(preset_name, "notebooks") / "timings.csv"
    if not path.exists():
        return [f"(no {preset_name} run yet: `make reproduce` writes {path.name})"]
    import pandas as pd

    df = pd.read_csv(path).drop_duplicates("notebook", keep="last")
    rows = [f"| {r.notebook} | {r.wall_s:.0f} s | {r.peak_rss_mb:.0f} MB |" for r in df.itertuples()]
    return ["| notebook | wall time | peak RSS |", "|---|---|---|", *rows, f"| total | {df.wall_s.sum():.0f} s | |"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny random model, a few prompts (CI)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results.md"))
    parser.add_argument("--prompts", type=int, default=None, help="prompts for the generation benchmark")
    parser.add_argument("--dtype", default="auto", help="the cpu preset's dtype (float32: as on a CPU without native bf16)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    if args.smoke:
        preset = get_preset("smoke", n_train_prompts=16, batch_size=4)
        n_prompts = args.prompts or 16
    else:
        preset = get_preset("cpu", n_train_prompts=48, dtype=args.dtype)
        n_prompts = args.prompts or 64
    timings = end_to_end("cpu")  # read from the real runs folder before benchmarks get a scratch one
    os.environ.setdefault("MIPO_RUNS_DIR", tempfile.mkdtemp(prefix="mipo-bench-"))

    results: dict[str, float] = {}
    results.update(bench_generation(preset, n_prompts))
    results.update(bench_evaluation(preset, n_prompts))
    results.update(bench_distinct_prompts(preset, n_prompts))
    results.update(bench_dpo(preset))
    assert single_weight_copy(preset), "DPO trainer created a second copy of the base model"

    lines = [
        f"# Benchmark results ({'smoke' if args.smoke else preset.name} preset)",
        "",
        f"- date: {dt.date.today().isoformat()}",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}, torch threads {torch.get_num_threads()}",
        f"- device: {'cuda ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}",
        f"- model: {preset.model_id}, dtype {preset.dtype}; {n_prompts} prompts for generation, {preset.n_train_prompts} pairs for DPO",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()),
        "",
        "## Headline ratios (goal in brackets)",
        "",
    ]
    for name, (op, goal) in GOALS.items():
        value = results[name]
        met = value >= goal if op == ">=" else value <= goal
        lines.append(f"{name}: {value:.2f}")
        lines.append(f"  (goal {op} {goal}: {'met' if met else 'MISSED'})")
    lines += ["", "## All measurements", "", "| measure | value |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in results.items()]
    lines += ["", "## Why (computed from this run)", "", *analysis(results)]
    if not torch.cuda.is_available():
        lines += ["- GPU (t4-class QLoRA DPO peak memory at max_length 1024, tokens/s, MFU, generation vs bandwidth): "
                  "not measured, no GPU on this machine; the README's T4 table is an estimate with its derivation."]
    lines += ["", "## End to end (`make reproduce`, cpu preset)", "", *timings, ""]
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
