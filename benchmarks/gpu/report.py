#!/usr/bin/env python3
"""The GPU measurements' report: the summary and the markdown of one run, from its gpu_results.json alone.

    python benchmarks/gpu/report.py OUT/gpu_results.json                  # print the run's markdown
    python benchmarks/gpu/report.py OUT/gpu_results.json --add "LABEL"    # also store it in benchmarks/results_gpu.json
    python benchmarks/gpu/report.py --show "LABEL"                        # print a stored run's markdown again
    python benchmarks/gpu/report.py --list                                # the stored runs' labels

`measure.py` writes gpu_results.md with the same functions after every part; `benchmarks/results_gpu.json` holds
every run behind `benchmarks/results_gpu.md` (one entry per run, keyed by a label that says when and what ran), so
each "full output" section there can be printed again from it. No torch, no mipo_lib: runs anywhere.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

MiB = 2**20
ROOT = Path(__file__).resolve().parents[2]
RESULTS_FILE = ROOT / "benchmarks" / "results_gpu.json"
T4_TOTAL_MIB = 15100  # torch.cuda total_memory of a Colab T4 (~15.8e9 B); its CUDA context takes ~300-450 MiB more
T4_FIT_MIB = 13828  # 14.5e9 B: what a T4 leaves torch after its CUDA context, with a margin
T4_TIGHT_MIB = 14700
#: The t4 preset's measured variants: the preset's automatic dtype (bf16 on an H100/H200, fp16 on a T4) and float16,
#: as a T4 runs it. Part names: `<variant>_load_generate`, `<variant>_dpo_reuse`.
T4_VARIANTS = ("t4", "t4_fp16")
#: Rows whose shapes cannot occur in the preset's pipeline (1024-token rows, 1024-token prompts): reported, not judged.
PROBES = ("scoring worst case", "~1024-token prompts")


def _g(d: Any, *keys: str) -> Any:
    """d[k1][k2]... or None where any level is missing."""
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _band(mib: Any) -> str:
    if not isinstance(mib, (int, float)):
        return "-"
    return "fits with margin" if mib < T4_FIT_MIB else "tight" if mib < T4_TIGHT_MIB else "does NOT fit"


def _gb(mib: Any) -> Any:
    return round(mib * MiB / 1e9, 2) if isinstance(mib, (int, float)) else None


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def part_dtype(part: Any) -> str | None:
    """The dtype a part ran in: its `dtype` record (resolved by hardware.select_dtype), else the preset it stored
    (runs from before the record existed asked for an explicit dtype)."""
    return _g(part, "dtype", "resolved") or _g(part, "preset", "dtype")


# ------------------------------------------------------------------------------------------------------ summary
def t4_stage_rows(results: dict[str, Any]) -> dict[str, tuple[str | None, Any]]:
    """Label -> (dtype, memory record) of every measured stage of the t4 preset, each variant's in turn."""
    p, sizes = results["parts"], results["meta"].get("sizes", {})
    gen = f"{sizes.get('t4_gen_prompts', 32)}x{sizes.get('t4_new_tokens', 256)}"
    rows: dict[str, tuple[str | None, Any]] = {}
    for v in T4_VARIANTS:
        lg, dpo = p.get(f"{v}_load_generate", {}), p.get(f"{v}_dpo_reuse", {})
        dt = part_dtype(lg)
        worst = _g(lg, "scoring_worst_case_max_length", "max_length") or 1024
        rows.update({
            f"{v} 4-bit load": (dt, _g(lg, "load", "memory")),
            f"{v} generation {gen}": (dt, _g(lg, "generation", "memory")),
            f"{v} scoring realistic (score batch 8)": (dt, _g(lg, "scoring_realistic_256_words", "memory")),
            f"{v} scoring worst case {worst} (score batch 8)": (dt, _g(lg, "scoring_worst_case_max_length", "memory")),
            f"{v} DPO reuse_reference=True (setup+sanity eval)": (part_dtype(dpo) or dt, _g(dpo, "memory_setup_and_sanity_eval")),
            f"{v} DPO reuse_reference=True (training)": (part_dtype(dpo) or dt, _g(dpo, "memory_training")),
        })
    trl, long, build = p.get("t4_dpo_trl_default", {}), p.get("t4_long_prompts", {}), p.get("t4_build_pairs", {})
    rows.update({
        "t4 DPO TRL default (setup+sanity eval)": (part_dtype(trl), _g(trl, "memory_setup_and_sanity_eval")),
        "t4 DPO TRL default (training)": (part_dtype(trl), _g(trl, "memory_training")),
        "t4 generation, ~1024-token prompts": (part_dtype(long), _g(long, "memory")),
        f"t4 build_pairs end to end ({build.get('n_prompts', 32)} prompts)": (part_dtype(build), _g(build, "memory")),
    })
    return rows


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of a run: t4 peaks per stage and the verdict against a T4, DPO speed, generation."""
    p = results["parts"]
    s: dict[str, Any] = {}
    s["t4_peaks_mib"] = {k: {"dtype": dt, "peak_allocated": m.get("peak_allocated_mib"),
                             "peak_reserved": m.get("peak_reserved_mib"), "t4": _band(m.get("peak_reserved_mib"))}
                         for k, (dt, m) in t4_stage_rows(results).items() if isinstance(m, dict) and "peak_reserved_mib" in m}
    if s["t4_peaks_mib"]:
        # the preset's own pipeline; the two worst-case probes are reported per row but cannot occur with 256-token
        # responses and the task's ~60-token prompts
        pipe = {k: v for k, v in s["t4_peaks_mib"].items() if not any(x in k for x in PROBES)} or s["t4_peaks_mib"]
        worst = max(pipe.items(), key=lambda kv: kv[1]["peak_reserved"])
        pr = worst[1]["peak_reserved"]
        s["t4_verdict"] = (f"largest peak reserved of the preset's stages (DPO at the full max_length 1024): {pr:.0f} MiB "
                           f"({pr * MiB / 1e9:.2f} GB) in '{worst[0]}' ({worst[1]['dtype']}): {_band(pr)} on a 16 GB T4 "
                           f"(~{T4_TOTAL_MIB} MiB visible to torch, minus ~300-450 MiB CUDA context; fit threshold "
                           f"14.5e9 B = {T4_FIT_MIB:,} MiB)")
        # against the README's estimates: the variant a T4 runs (float16) where it was measured
        v = next((v for v in reversed(T4_VARIANTS) if f"{v}_load_generate" in p), "t4")
        lg = p.get(f"{v}_load_generate", {})
        s["readme_vs_measured_variant"] = f"{v} ({part_dtype(lg)})"
        s["readme_vs_measured_gb"] = {
            "4-bit load (README ~1.2 GB)": _gb(_g(lg, "load", "memory", "allocated_mib")),
            "generation (README ~2 GB)": _gb(_g(lg, "generation", "memory", "peak_reserved_mib")),
            "QLoRA DPO training (README ~3-4 GB)": _gb(_g(p, f"{v}_dpo_reuse", "memory_training", "peak_reserved_mib")),
        }
    for tag in [f"{v}_dpo_reuse" for v in T4_VARIANTS] + ["t4_dpo_trl_default"]:
        if tag in p:
            s[tag] = {k: p[tag].get(k) for k in ("median_step_s_after_first", "tokens_per_s", "mfu_6N",
                                                  "mfu_est_actual", "peak_reserved_mib", "initial_sanity")}
            s[tag]["dtype"] = part_dtype(p[tag])
    if "t4_dpo_reuse" in p and "t4_dpo_trl_default" in p:
        a, b = p["t4_dpo_reuse"]["median_step_s_after_first"], p["t4_dpo_trl_default"]["median_step_s_after_first"]
        s["t4_step_time_reuse_vs_default"] = round(a / b, 3) if a and b else None
    g = p.get("gen_speedup", {})
    if "generation_vs_naive" in g:
        s["generation"] = {"batched_tok_s": g["batched"]["tokens_per_s"], "naive_tok_s": g["naive"]["tokens_per_s"],
                           "scoring_tok_s": g["scoring"]["tokens_per_s"], "vs_naive": g["generation_vs_naive"],
                           "vs_scoring": g["generation_vs_scoring"], "goals": g["goals"],
                           "batched_large": g.get("batched_large"), "dtype": part_dtype(g)}
    for tag in ("paper", "paper_gc"):
        if tag in p and "dpo" in p[tag]:
            d = p[tag]["dpo"]
            s[tag] = {k: d.get(k) for k in ("median_step_s_after_first", "tokens_per_s", "mfu_6N", "mfu_est_actual",
                                             "peak_allocated_mib", "peak_reserved_mib")}
            s[tag]["scoring_peak_reserved_mib"] = _g(p[tag], "scoring_worst_case_max_length", "memory",
                                                     "peak_reserved_mib")
            s[tag]["dtype"] = part_dtype(p[tag])
    return s


# ----------------------------------------------------------------------------------------------------- markdown
DPO_ROWS = (("t4_dpo_reuse", "t4 QLoRA DPO, reference reused"), ("t4_fp16_dpo_reuse", "t4 QLoRA DPO, reference reused"),
            ("t4_dpo_trl_default", "t4 QLoRA DPO, TRL reference fwd"), ("paper", "paper bf16 LoRA r64 DPO"),
            ("paper_gc", "paper + gradient checkpointing"))


def _header(results: dict[str, Any]) -> list[str]:
    r, env = results, results["parts"].get("env", {})
    fh = env.get("trl_fused_lm_head", {})
    meta = r["meta"]
    lines = [f"# MIPO GPU measurements ({'TINY test shapes, not results' if meta.get('tiny') else 'real shapes, random weights'})", "",
             f"- device: {env.get('device_name', 'cpu')} (sm {env.get('capability')}, {env.get('total_memory_mib')} MiB), "
             f"torch {_g(env, 'versions', 'torch')} CUDA {env.get('torch_cuda')}, CUDA context {env.get('context_overhead_mib')} MiB",
             f"- versions: {env.get('versions')}"]
    if env.get("pin_mismatches") is not None:
        lines += [f"- against the project's pins: {'; '.join(env['pin_mismatches']) or 'all as pinned'}"]
    lines += [f"- TRL fused LM head: ok={fh.get('fused_head_ok')}, triton {fh.get('triton_version')}"
              + (" -> Triton DISABLED, TRL torch tiles used (slower)" if fh.get("triton_disabled") else ""),
              f"- bitsandbytes 4-bit check: {env.get('bnb_4bit_ok')} {env.get('bnb_4bit_error') or ''}",
              f"- Triton disabled after a failure: {meta.get('triton_disabled_after') or 'no'}",
              f"- elapsed {meta.get('elapsed_s')} s (budget {meta.get('budget_s')} s); MFU peak: {env.get('peak_tflops_note')}"]
    dtypes = [f"{name} {d['requested']} -> {d['resolved']}" + (f" ({d['note']})" if d.get("note") else "")
              for name, part in r["parts"].items() if isinstance(d := part.get("dtype"), dict)]
    if dtypes:
        lines += [f"- dtype per part (asked -> used, hardware.select_dtype): {'; '.join(dtypes)}"]
    return lines + [""]


def _t4_section(results: dict[str, Any], s: dict[str, Any]) -> list[str]:
    if "t4_verdict" not in s:
        return []
    p = results["parts"]
    lines = ["## t4 preset (Qwen2.5-1.5B-Instruct shape, 4-bit NF4 + double quant, LoRA r16 all linear)", "",
             f"**{s['t4_verdict']}**", "", "| stage | dtype | peak allocated MiB | peak reserved MiB | on a T4 |",
             "|---|---|---|---|---|"]
    fallback = part_dtype(p.get("t4_load_generate"))
    lines += [f"| {k} | {v.get('dtype') or fallback or '-'} | {_fmt(v['peak_allocated'])} | {_fmt(v['peak_reserved'])} | {v['t4']} |"
              for k, v in s["t4_peaks_mib"].items()]
    variant = s.get("readme_vs_measured_variant")
    lines += ["", "README estimate vs measured (GB = 1e9 B; load: allocated after load; others: peak reserved"
              + (f"; {variant}" if variant else "") + "):", ""]
    lines += [f"- {k}: **{v} GB**" for k, v in s.get("readme_vs_measured_gb", {}).items()]
    for v in T4_VARIANTS:
        lg = p.get(f"{v}_load_generate", {})
        if lg.get("load"):
            lines += [f"- {v} load: memory_footprint_mb {lg['load'].get('memory_footprint_mb')}, {lg['load'].get('load_s')} s, "
                      f"dtypes {lg['load'].get('param_dtypes')}"]
        if lg.get("generation"):
            g = lg["generation"]
            lines += [f"- {v} generation: {g['prompts']} prompts x {g['max_new_tokens']} new tokens (batch {g['batch_size']}): "
                      f"{_fmt(g['tokens_per_s'])} tok/s, {g['generate_s']} s, all ran to max: {g['all_ran_to_max']}"]
    return lines + [""]


def _dpo_section(results: dict[str, Any], s: dict[str, Any]) -> list[str]:
    p = results["parts"]
    rows = []
    for tag, label in DPO_ROWS:
        d = p.get(tag, {}).get("dpo") if tag.startswith("paper") else p.get(tag)
        if d:
            dt = part_dtype(d) or part_dtype(p.get(tag))
            rows.append(f"| {label} | {dt or '-'} | {d.get('batch_size')}x{d.get('grad_accum')}, {d.get('max_length')} | "
                        f"{d.get('optimizer_steps')} | {_fmt(d.get('median_step_s_after_first'))} | {_fmt(d.get('tokens_per_s'))} | "
                        f"{_fmt(d.get('mfu_6N'))} | {_fmt(d.get('mfu_est_actual'))} | {_fmt(d.get('peak_allocated_mib'))} | "
                        f"{_fmt(d.get('peak_reserved_mib'))} | {_fmt(_g(d, 'memory_training', 'peak_reserved_mib'))} | "
                        f"{_fmt(_g(d, 'initial_sanity', 'loss'))} |")
    if not rows:
        return []
    lines = ["## DPO (dpo.train_dpo)", "",
             "| run | dtype | batch x accum, max_length | steps | s/step (median, after 1st) | tokens/s | MFU 6N | MFU est. actual | "
             "peak alloc MiB (incl. sanity eval) | peak reserved MiB | training-only peak reserved MiB | initial loss |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|", *rows, "",
             "MFU 6N: 6 x base parameters x tokens / s / peak (upper-bound convention for LoRA); est. actual: "
             "6N (QLoRA + checkpointing: fwd + recompute + input grads), 8N with TRL's reference forward, 4N for "
             "bf16 LoRA without checkpointing. Attention-score FLOPs excluded."]
    if "t4_step_time_reuse_vs_default" in s:
        lines += ["", f"t4 step time, reused reference / TRL default: **{s['t4_step_time_reuse_vs_default']}** (goal <= 0.70)"]
    for tag in ("paper", "paper_gc"):
        sc = _g(p, tag, "scoring_worst_case_max_length")
        if sc:
            lines += [f"- {tag} reference scoring at max_length (score batch {sc['score_batch_size']}): peak reserved "
                      f"{_fmt(_g(sc, 'memory', 'peak_reserved_mib'))} MiB, {_fmt(sc['total_tokens_per_s'])} tok/s"]
    return lines + [""]


def _generation_section(results: dict[str, Any]) -> list[str]:
    g = results["parts"].get("gen_speedup", {})
    if "generation_vs_naive" not in g:
        return []
    lines = [f"## Generation vs naive vs scoring (SmolLM2-135M shape, {part_dtype(g) or 'bfloat16'}, cpu-preset sampling)", "",
             "| measure | tokens/s |", "|---|---|",
             f"| batched generate_batches, {g['batched']['prompts']} prompts, batch {g['batched']['batch_size']} | {_fmt(g['batched']['tokens_per_s'])} |",
             f"| naive, one prompt at a time ({g['naive']['prompts']} prompts) | {_fmt(g['naive']['tokens_per_s'])} |",
             f"| teacher-forced scoring (sequence_logprobs, batch {g['scoring']['batch_size']}) | {_fmt(g['scoring']['tokens_per_s'])} |"]
    if g.get("batched_large"):
        b = g["batched_large"]
        lines += [f"| batched, {b['prompts']} prompts in one batch | {_fmt(b['tokens_per_s'])} |"]
    return lines + ["", f"batched / naive = **{g['generation_vs_naive']}x** (goal >= 8); batched / scoring = "
                    f"**{g['generation_vs_scoring']}** (goal >= 0.30)", ""]


def _extras_section(results: dict[str, Any]) -> list[str]:
    p, lines = results["parts"], []
    for tag in ("t4_long_prompts", "t4_build_pairs"):
        if tag in p:
            d = {k: v for k, v in p[tag].items() if k != "manifest"}
            lines += [f"- {tag}: {d}"]
            if tag == "t4_build_pairs":
                m = p[tag].get("manifest", {})
                lines += [f"  manifest: generation {m.get('generation_seconds')} s at {m.get('generation_tokens_per_s')} tok/s, "
                          f"scoring {m.get('scoring_seconds')} s for {m.get('scored_tokens')} tokens"]
    return lines


def markdown(results: dict[str, Any]) -> str:
    """The run's report (gpu_results.md), from its parts alone (the summary is computed again, so runs stored in
    results_gpu.json render with today's summary)."""
    s = summarize(results)
    lines = _header(results) + _t4_section(results, s) + _dpo_section(results, s) + _generation_section(results)
    lines += _extras_section(results)
    if results["errors"]:
        lines += ["", "## Errors", ""] + [f"- {k}: {v.strip().splitlines()[-1] if v else v}" for k, v in results["errors"].items()]
    if results["skipped"]:
        lines += ["", "## Skipped", ""] + [f"- {k}: {v}" for k, v in results["skipped"].items()]
    lines += ["", "Full numbers: gpu_results.json. Random weights, real architectures: memory numbers transfer to other "
              "GPUs (within the CUDA context and kernel workspaces); times and MFU are for this device only."]
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------- results_gpu.json
def load_runs(path: Path = RESULTS_FILE) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def add_run(results: dict[str, Any], label: str, path: Path = RESULTS_FILE) -> None:
    """Store a run under `label`, newest first; a label is never overwritten (the file is the record of every run)."""
    runs = load_runs(path)
    if label in runs:
        raise SystemExit(f"{path.name} already has a run labelled {label!r}; choose another label")
    if results["meta"].get("tiny"):
        raise SystemExit("a --tiny run measures nothing (scaled-down shapes): it is not stored")
    path.write_text(json.dumps({label: results, **runs}, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="?", type=Path, help="a run's gpu_results.json")
    ap.add_argument("--add", metavar="LABEL", help="store the run in results_gpu.json under LABEL")
    ap.add_argument("--show", metavar="LABEL", help="print a stored run's markdown")
    ap.add_argument("--list", action="store_true", help="list the stored runs")
    ap.add_argument("--file", type=Path, default=RESULTS_FILE, help="the runs file (default: benchmarks/results_gpu.json)")
    args = ap.parse_args(argv)
    if args.list:
        print("\n".join(load_runs(args.file)))
        return 0
    if args.show:
        runs = load_runs(args.file)
        if args.show not in runs:
            raise SystemExit(f"no run labelled {args.show!r} in {args.file}; --list shows the labels")
        print(markdown(runs[args.show]), end="")
        return 0
    if args.results is None:
        ap.error("give a gpu_results.json, --show LABEL or --list")
    results = json.loads(args.results.read_text())
    results["summary"] = summarize(results)
    if args.add:
        add_run(results, args.add, args.file)
    print(markdown(results), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
