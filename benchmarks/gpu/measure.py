#!/usr/bin/env python3
"""One-shot GPU measurements for the MIPO workbook, with the project's own functions (mipo_lib).

    OUT=/tmp/gpuout python gpu/measure.py            # real shapes (GPU; about 4-5 min on an H200)
    OUT=/tmp/gpuout python gpu/measure.py --tiny     # every shape scaled down: a CPU test of the plumbing

Parts, in priority order (each one is caught on its own; results are written to $OUT after every part):
  env         versions, device, CUDA context size, bitsandbytes 4-bit check (models.check_4bit_backend)
  t4_*        the `t4` preset on a Qwen2.5-1.5B-Instruct-shaped model with random weights (built from a config in
              code, saved fp16, loaded with models.load_for_preset: 4-bit NF4, double quant, fp16 compute):
              load footprint; pair generation (generate.generate_batches, 32 prompts x 256 new tokens, batch 32);
              reference scoring (scoring.sequence_logprobs, score batch 8) at a realistic and the worst-case length;
              QLoRA DPO (dpo.train_dpo) on synthetic pairs that fill max_length 1024, reuse_reference True/False
  gen_*       batched generate_batches vs naive one-prompt-at-a-time on the SmolLM2-135M shape (bf16), and
              teacher-forced scoring throughput (goals: batched >= 8x naive, >= 30% of scoring)
  paper_*     the `paper` preset on a Llama-3.2-1B-Instruct shape: bf16 LoRA r64, batch 4, max_length 1536
              (paper_gc: the same with gradient checkpointing)
  t4_long_prompts  generation with ~1024-token prompts + 256 new tokens (the README's 32 x 1,280 KV-cache case)
  t4_build_pairs   pairs.build_pairs end to end for 32 prompts (positives, context-drop negatives, scoring)
Parts start only while the --budget allows their rough cost; an outer `timeout -s INT` leaves partial results.
Random weights almost never emit EOS, so every generation runs to max_new_tokens (the worst case).
Memory: torch.cuda peak allocated/reserved, peaks reset before each part (context not included; measured once).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("MIPO_RUNS_DIR", "/tmp/mipo-gpu-runs")
os.environ.setdefault("MIPO_CACHE", "/tmp/mipo-gpu-cache")
os.environ.setdefault("HF_HOME", "/tmp/mipo-gpu-hf")
os.environ.setdefault("HF_DATASETS_CACHE", "/tmp/mipo-gpu-hf/datasets")
os.environ.setdefault("TRITON_CACHE_DIR", "/tmp/mipo-gpu-triton")

T0 = time.perf_counter()
HERE = Path(__file__).resolve().parent
MiB = 2**20

# README estimates (t4 preset on a T4) the measurements are compared with.
README_T4 = {"load_gb": 1.2, "generation_gb": 2.0, "dpo_gb": "3-4"}
# Dense fp16/bf16 tensor-core peak (no sparsity), by device name; used for MFU only.
PEAK_TFLOPS = [("H200", 989.4), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.4), ("A100", 312.0),
               ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0), ("T4", 65.0)]
T4_TOTAL_MIB = 15100  # torch.cuda total_memory of a Colab T4 (~15.8e9 B); its CUDA context takes ~300-450 MiB more


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------- shapes/sizes
QWEN15 = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
              num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True,
              use_sliding_window=False, sliding_window=32768, max_window_layers=21,
              rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
SMOLLM135 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5,
                 tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
LLAMA1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5,
               tie_word_embeddings=True,
               rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
TINY_DIMS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16)

FULL = dict(t4_gen_prompts=32, t4_new_tokens=256, t4_steps=12, t4_max_length=None, t4_real_resp_words=256,
            t4_long_prompt_words=1000, gen_prompts=64, gen_new=64, gen_naive=8, gen_naive_max_s=20.0,
            gen_big_prompts=256, paper_steps=6, paper_max_length=None, warm_new=8)
TINY = dict(t4_gen_prompts=4, t4_new_tokens=8, t4_steps=2, t4_max_length=96, t4_real_resp_words=24,
            t4_long_prompt_words=60, gen_prompts=8, gen_new=8, gen_naive=2, gen_naive_max_s=30.0,
            gen_big_prompts=16, paper_steps=2, paper_max_length=96, warm_new=2)


# ------------------------------------------------------------------------------------------------------- state
class State:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sizes = TINY if args.tiny else FULL
        self.out = Path(os.environ.get("OUT") or "/tmp/gpuout")
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.workdir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.results: dict[str, Any] = {"meta": {}, "parts": {}, "errors": {}, "skipped": {}, "summary": {}}
        self.deadline = T0 + args.budget
        self.ctx: dict[str, Any] = {}

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def write(self) -> None:
        self.results["meta"]["elapsed_s"] = round(time.perf_counter() - T0, 1)
        try:
            self.results["summary"] = summarize(self)
        except Exception as exc:  # noqa: BLE001
            self.results["summary"] = {"error": repr(exc)}
        tmp = self.out / "gpu_results.json.tmp"
        tmp.write_text(json.dumps(self.results, indent=1, default=_json_default))
        tmp.replace(self.out / "gpu_results.json")
        try:
            (self.out / "gpu_results.md").write_text(markdown(self))
        except Exception as exc:  # noqa: BLE001
            (self.out / "gpu_results.md").write_text(f"markdown failed: {exc!r}\n")


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
    except Exception:  # noqa: BLE001
        pass
    return repr(o)


# ------------------------------------------------------------------------------------------------ device helpers
def device() -> Any:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def clean() -> None:
    """Free what can be freed and reset the peak counters, so the next part's peaks are its own."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def mem() -> dict[str, float]:
    """Current and peak memory (MiB): torch.cuda counters on a GPU, process RSS on a CPU."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        st = torch.cuda.memory_stats()
        return {
            "allocated_mib": round(torch.cuda.memory_allocated() / MiB, 1),
            "reserved_mib": round(torch.cuda.memory_reserved() / MiB, 1),
            "peak_allocated_mib": round(torch.cuda.max_memory_allocated() / MiB, 1),
            "peak_reserved_mib": round(torch.cuda.max_memory_reserved() / MiB, 1),
            "alloc_retries": int(st.get("num_alloc_retries", 0)),
            "ooms": int(st.get("num_ooms", 0)),
            "device_used_now_mib": round((lambda f, t: (t - f) / MiB)(*torch.cuda.mem_get_info()), 1),
        }
    import psutil

    return {"rss_mib": round(psutil.Process().memory_info().rss / MiB, 1)}


def peak_tflops() -> tuple[float | None, str]:
    import torch

    if not torch.cuda.is_available():
        return None, "cpu"
    name = torch.cuda.get_device_name()
    for key, tf in PEAK_TFLOPS:
        if key in name:
            return tf, f"{name}: assumed {tf} dense fp16/bf16 TFLOPS (no sparsity; {key} table entry)"
    return None, f"{name}: unknown peak"


# --------------------------------------------------------------------------------------------------- model dirs
def tokenizer_dir() -> Path:
    tok = HERE / "tok"
    if not (tok / "tokenizer.json").exists():
        raise RuntimeError(f"tokenizer files missing in {tok}")
    return tok


def build_model_dir(st: State, name: str, family: str, shape: dict[str, Any], dtype_name: str) -> dict[str, Any]:
    """A random-weight checkpoint of a real architecture (config made in code) + the SmolLM2 chat tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    target = st.work / name
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    kw = dict(shape)
    if st.args.tiny:
        kw.update(TINY_DIMS)
        if family == "qwen2":
            kw.pop("head_dim", None)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if family == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    config = cfg_cls(**kw, **ids)
    dtype = getattr(torch, dtype_name)
    dev = device()
    start = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(dev):
        model = model_cls(config).to(dtype)
    n_params = sum(p.numel() for p in model.parameters())
    n_embed = model.get_input_embeddings().weight.numel()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(target)
    for f in tokenizer_dir().iterdir():
        if f.is_file():
            shutil.copy(f, target / f.name)
    del model
    clean()
    info = {"dir": str(target), "family": family, "n_params": n_params, "n_embedding_params": n_embed,
            "config": {k: v for k, v in kw.items()}, "dtype_saved": dtype_name,
            "tokenizer_vocab": len(tok), "build_and_save_s": round(time.perf_counter() - start, 1),
            "disk_mib": round(sum(f.stat().st_size for f in target.iterdir()) / MiB, 1)}
    log(f"built {name}: {n_params / 1e6:.1f} M params ({n_embed / 1e6:.1f} M embedding), {info['disk_mib']} MiB on disk, "
        f"{info['build_and_save_s']} s")
    return info


def words_text(n_words: int, rng: Any) -> str:
    vocab = ("the of and to in is you that it he was for on are as with his they at be this have from or one had by "
             "word but not what all were we when your can said there use an each which she do how their if will up other "
             "about out many then them these so some her would make like him into time has look two more write go see "
             "number no way could people my than first water been call who oil its now find long down day did get come "
             "made may part garden bright simple morning travel kitchen answer music river window coffee letter").split()
    return " ".join(vocab[int(i)] for i in rng.integers(0, len(vocab), n_words))


def synth_pairs(model: Any, tok: Any, preset: Any, n: int, resp_words: int, seed: int = 0,
                score: bool = True) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """MIPO-format pairs (pairs.build_pairs' fields) on real task prompts with synthetic responses of `resp_words`
    words; reference log-probs and token counts come from scoring.sequence_logprobs, as in build_pairs."""
    import numpy as np
    from mipo_lib.scoring import sequence_logprobs
    from mipo_lib.tasks import get_task

    task = get_task(preset.task)
    examples = task.examples("train", seed=0)[:n]
    rng = np.random.default_rng(seed)
    prompts = [task.prompt(e) for e in examples]
    chosen = [words_text(resp_words, rng) for _ in examples]
    rejected = [words_text(resp_words, rng) for _ in examples]
    info: dict[str, Any] = {"n_pairs": n, "response_words": resp_words, "max_length": preset.max_length,
                            "score_batch_size": preset.score_batch_size}
    clean()
    sync()
    start = time.perf_counter()
    logps, lengths = sequence_logprobs(model, tok, prompts + prompts, chosen + rejected, max_length=preset.max_length,
                                       batch_size=preset.score_batch_size)
    sync()
    secs = time.perf_counter() - start
    from mipo_lib.scoring import pair_tokens, token_digest

    prompt_lens = [len(pair_tokens(tok, p, "x")[0]) for p in prompts]
    total_tokens = sum(prompt_lens) * 2 + int(lengths.sum())
    info.update({"scoring_s": round(secs, 3), "completion_tokens": int(lengths.sum()), "total_tokens": total_tokens,
                 "completion_tokens_per_s": round(float(lengths.sum()) / secs, 1),
                 "total_tokens_per_s": round(total_tokens / secs, 1),
                 "prompt_tokens_min_max": [min(prompt_lens), max(prompt_lens)],
                 "sequence_tokens_min_max": [min(p + int(c) for p, c in zip(prompt_lens * 2, lengths)),
                                             max(p + int(c) for p, c in zip(prompt_lens * 2, lengths))],
                 "memory": mem()})
    pairs = []
    for j, e in enumerate(examples):
        pairs.append({
            "pair_id": f"{e.id}-n0", "example_id": e.id, "group": task.group(e), "negative_source": "synthetic",
            "prompt": prompts[j], "negative_prompt": prompts[j], "chosen": chosen[j], "rejected": rejected[j],
            "ref_chosen_logps": float(logps[j]), "ref_rejected_logps": float(logps[n + j]),
            "chosen_tokens": int(lengths[j]), "rejected_tokens": int(lengths[n + j]),
            "chosen_token_digest": token_digest(*pair_tokens(tok, prompts[j], chosen[j], preset.max_length)),
            "rejected_token_digest": token_digest(*pair_tokens(tok, prompts[j], rejected[j], preset.max_length)),
        })
    info["tokens_per_pair"] = [prompt_lens[j] * 2 + int(lengths[j]) + int(lengths[n + j]) for j in range(n)]
    return pairs, info


# ------------------------------------------------------------------------------------------------------- DPO run
def run_dpo(st: State, model: Any, tok: Any, pairs: list[dict[str, Any]], preset: Any, reuse: bool, n_base: int,
            flops_mult: float, tag: str) -> dict[str, Any]:
    """dpo.train_dpo with a step timer and memory probes attached through dpo._prepare (train_dpo itself unchanged)."""
    import torch
    from transformers import TrainerCallback

    from mipo_lib import dpo

    class Probe(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.begin = None
            self.pre_train = None
            self.train_mem = None
            self.trainable = None

        def on_train_begin(self, args, state, control, **kw):  # noqa: ANN001
            self.pre_train = mem()  # peaks since train_dpo's reset: trainer set-up, tokenization, initial_sanity eval
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            sync()
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
            sync()
            self.ends.append(time.perf_counter())

        def on_train_end(self, args, state, control, **kw):  # noqa: ANN001
            self.train_mem = mem()

    probe = Probe()
    original = dpo._prepare

    def prepare(trainer: Any, progress: bool) -> None:
        original(trainer, progress)
        trainer.add_callback(probe)
        params = list(trainer.model.parameters())
        train = [p for p in params if p.requires_grad]
        probe.trainable = {"trainable_params": sum(p.numel() for p in train),
                           "trainable_dtypes": sorted({str(p.dtype) for p in train}),
                           "frozen_param_dtypes": sorted({str(p.dtype) for p in params if not p.requires_grad})}

    dpo._prepare = prepare
    adapter_dir = st.work / f"adapter-{tag}"
    shutil.rmtree(adapter_dir, ignore_errors=True)
    try:
        sync()
        start = time.perf_counter()
        res = dpo.train_dpo(model, tok, pairs, preset, 0, adapter_dir, reuse_reference=reuse, redo=True, progress=False)
        sync()
        wall = time.perf_counter() - start
    except BaseException:
        # keep what the probe saw (an OOM or a timeout mid-training is itself a measurement)
        st.results["parts"][f"{tag}_partial"] = {
            "step_ends_s": [round(t - probe.begin, 3) for t in probe.ends] if probe.begin else [],
            "memory_setup_and_sanity_eval": probe.pre_train, "memory_now": _safe(mem), **(probe.trainable or {})}
        raise
    finally:
        dpo._prepare = original
    steps = [b - a for a, b in zip([probe.begin] + probe.ends[:-1], probe.ends)] if probe.begin else []
    n_steps = len(steps)
    tokens_total = sum(int(p["chosen_tokens"]) + int(p["rejected_tokens"]) for p in pairs) + \
        sum(2 * (len(_prompt_ids(tok, p["prompt"]))) for p in pairs)
    tokens_per_step = tokens_total / max(1, n_steps)
    steady = sorted(steps[1:]) if n_steps > 1 else steps
    s_step = steady[len(steady) // 2] if steady else float("nan")
    peak_tf, peak_note = peak_tflops()
    out: dict[str, Any] = {
        "reuse_reference": reuse, "n_pairs": len(pairs), "optimizer_steps": n_steps,
        "batch_size": preset.batch_size, "grad_accum": preset.grad_accum, "max_length": preset.max_length,
        "gradient_checkpointing": preset.gradient_checkpointing, "lora_r": preset.lora_r,
        "train_dpo_wall_s": round(wall, 2), "trainer_seconds": round(res.seconds, 2),
        "first_step_s": round(steps[0], 3) if steps else None,
        "median_step_s_after_first": round(s_step, 3),
        "mean_step_s_after_first": round(sum(steps[1:]) / max(1, n_steps - 1), 3) if n_steps > 1 else None,
        "step_s_all": [round(s, 3) for s in steps],
        "tokens_per_step": tokens_per_step,
        "tokens_per_s": round(tokens_per_step / s_step, 1) if s_step == s_step else None,
        "initial_sanity": res.sanity,
        "memory_setup_and_sanity_eval": probe.pre_train,
        "memory_training": probe.train_mem,
        **(probe.trainable or {}),
        "losses": [round(float(x), 4) for x in res.log["loss"].tolist()] if "loss" in res.log else None,
        "reward_accuracies": [round(float(x), 3) for x in res.log["rewards/accuracies"].tolist()]
        if "rewards/accuracies" in res.log else None,
        "lora_changed_fraction": (sum(res.lora_changed.values()) / len(res.lora_changed)) if res.lora_changed else None,
    }
    if s_step == s_step and s_step > 0:
        achieved_6n = 6 * n_base * tokens_per_step / s_step
        achieved_est = flops_mult * n_base * tokens_per_step / s_step
        out["flops_convention"] = (f"6*N*tokens per step, N = {n_base / 1e9:.3f} B base parameters (upper-bound "
                                   f"convention for LoRA); 'estimated actual' uses {flops_mult}*N per token; attention "
                                   "score FLOPs excluded")
        out["achieved_tflops_6N"] = round(achieved_6n / 1e12, 1)
        out["achieved_tflops_est_actual"] = round(achieved_est / 1e12, 1)
        if peak_tf:
            out["mfu_6N"] = round(achieved_6n / (peak_tf * 1e12), 4)
            out["mfu_est_actual"] = round(achieved_est / (peak_tf * 1e12), 4)
            out["peak_note"] = peak_note
    pk = [m for m in (probe.pre_train, probe.train_mem) if m]
    if pk and "peak_reserved_mib" in pk[0]:
        out["peak_allocated_mib"] = max(m["peak_allocated_mib"] for m in pk)
        out["peak_reserved_mib"] = max(m["peak_reserved_mib"] for m in pk)
    shutil.rmtree(adapter_dir, ignore_errors=True)
    log(f"{tag}: {n_steps} steps, median {s_step:.3f} s/step, {out.get('tokens_per_s')} tok/s, "
        f"peak alloc/reserved {out.get('peak_allocated_mib')}/{out.get('peak_reserved_mib')} MiB, "
        f"MFU(6N) {out.get('mfu_6N')}, sanity {res.sanity}")
    return out


def _safe(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except BaseException as exc:  # noqa: BLE001
        return repr(exc)


def _prompt_ids(tok: Any, prompt: Any) -> list[int]:
    from mipo_lib.scoring import pair_tokens

    return pair_tokens(tok, prompt, "x")[0]


def load(st: State, preset: Any) -> tuple[Any, Any, dict[str, Any]]:
    from mipo_lib.models import is_4bit, load_for_preset, memory_footprint_mb

    clean()
    sync()
    start = time.perf_counter()
    retry_error = None
    try:
        model, tok = load_for_preset(preset)
    except Exception as exc:  # noqa: BLE001 - a GPU-only failure of the project's loader is a finding; try once more
        import torch

        if not torch.cuda.is_available():
            raise
        retry_error = repr(exc)[-600:]
        log(f"load_for_preset failed on the GPU ({retry_error}); retrying with device='cuda:0'")
        clean()
        start = time.perf_counter()
        model, tok = load_for_preset(preset, device="cuda:0")
    sync()
    secs = time.perf_counter() - start
    cpu_workaround = 0
    if preset.load_in_4bit and next(model.parameters()).device.type == "cpu":
        # CPU test only: on AVX512-BF16 CPUs bitsandbytes repacks 4-bit weights for inference at the first eval
        # forward, and training a layer with a bias (Qwen2 q/k/v) afterwards fails in matmul_4bit's packed path.
        for m in model.modules():
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
                cpu_workaround += 1
    info = {"load_s": round(secs, 2), "memory_footprint_mb": round(memory_footprint_mb(model), 1),
            "cpu_bnb_repack_disabled_layers": cpu_workaround, "first_load_error": retry_error,
            "is_4bit": bool(is_4bit(model)) if preset.load_in_4bit else False,
            "param_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
            "device": str(next(model.parameters()).device), "memory": mem()}
    return model, tok, info


# ------------------------------------------------------------------------------------------------------- parts
def part_env(st: State) -> dict[str, Any]:
    import importlib.metadata as md

    import torch

    from mipo_lib.models import check_4bit_backend

    vers = {}
    for name in ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets", "huggingface_hub",
                 "tokenizers", "safetensors", "numpy", "pandas", "pyarrow", "dill", "multiprocess", "fsspec", "httpx"):
        try:
            vers[name] = md.version(name)
        except Exception:  # noqa: BLE001
            vers[name] = "not installed"
    import transformers
    import trl

    import mipo_lib

    info: dict[str, Any] = {"versions": vers, "transformers_module": transformers.__version__,
                            "trl_module": trl.__version__, "mipo_lib_file": mipo_lib.__file__,
                            "python": platform.python_version(), "cpu_count": os.cpu_count(),
                            "torch_threads": torch.get_num_threads(), "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        torch.zeros(1, device="cuda")
        free_b, total_b = torch.cuda.mem_get_info()
        info.update({"device_name": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
                     "sm_count": props.multi_processor_count, "total_memory_mib": round(total_b / MiB, 1),
                     "torch_cuda": torch.version.cuda, "bf16_supported": torch.cuda.is_bf16_supported(),
                     "context_overhead_mib": round((total_b - free_b - torch.cuda.memory_reserved()) / MiB, 1),
                     "cudnn": torch.backends.cudnn.version()})
    info["peak_tflops_note"] = peak_tflops()[1]
    info["trl_fused_lm_head"] = check_fused_lm_head()
    log(f"TRL fused LM head check: {info['trl_fused_lm_head']}")
    try:
        check_4bit_backend(device())
        info["bnb_4bit_ok"] = True
    except Exception as exc:  # noqa: BLE001
        info["bnb_4bit_ok"] = False
        info["bnb_4bit_error"] = str(exc)
    log(f"env: {info.get('device_name', 'cpu')} | {vers} | 4-bit ok: {info['bnb_4bit_ok']}")
    return info


def check_fused_lm_head() -> dict[str, Any]:
    """TRL 1.16's DPO computes log-probs with a fused LM head that runs Triton kernels on CUDA (JIT-compiled: needs a
    working Triton + C compiler). Try it on a toy model; if it fails, switch TRL to its torch tiles and say so."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import trl.kernels.chunked_logprob as cl
    from trl.trainer.utils import add_fused_lm_head

    info: dict[str, Any] = {"trl_triton_flag": bool(cl._TRITON_AVAILABLE)}
    try:
        import triton

        info["triton_version"] = triton.__version__
    except Exception as exc:  # noqa: BLE001
        info["triton_version"] = f"not importable: {exc!r}"

    def attempt() -> float:
        cfg = LlamaConfig(vocab_size=5000, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2)
        dev = device()
        with torch.device(dev):
            m = LlamaForCausalLM(cfg).to(torch.bfloat16 if dev.type == "cuda" else torch.float32)
        add_fused_lm_head(m)
        ids = torch.randint(0, 5000, (2, 48), device=dev)
        out = m(input_ids=ids, labels=ids, fused_lm_head=True)
        out.log_probs.float().sum().backward()
        sync()
        return float(out.log_probs.float().mean())

    start = time.perf_counter()
    try:
        info["mean_logprob"] = attempt()
        info["fused_head_ok"] = True
    except Exception as exc:  # noqa: BLE001
        info["fused_head_ok"] = False
        info["error"] = repr(exc)[-800:]
        if cl._TRITON_AVAILABLE:
            cl._TRITON_AVAILABLE = False  # TRL's own torch fallback (`_forward_tile`)
            info["triton_disabled"] = True
            try:
                info["mean_logprob_torch_tiles"] = attempt()
                info["torch_tiles_ok"] = True
            except Exception as exc2:  # noqa: BLE001
                info["torch_tiles_ok"] = False
                info["error_torch_tiles"] = repr(exc2)[-800:]
    info["seconds"] = round(time.perf_counter() - start, 1)
    return info


def triton_fallback(st: State, name: str, fn: Callable[[], Any]) -> Any:
    """Run a training part; if it fails inside TRL's Triton kernels, rerun it once on TRL's torch tiles."""
    import trl.kernels.chunked_logprob as cl

    try:
        return fn()
    except Exception as exc:  # noqa: BLE001
        text = traceback.format_exc().lower()
        if not (cl._TRITON_AVAILABLE and "triton" in text):
            raise
        cl._TRITON_AVAILABLE = False
        st.results["meta"]["triton_disabled_after"] = f"{name}: {repr(exc)[-600:]}"
        log(f"{name} failed in Triton ({exc!r}); rerunning with TRL's torch tiles")
    clean()  # outside the except block: the failed attempt's model is released first
    return fn()


def t4_preset(st: State) -> Any:
    from mipo_lib.config import get_preset

    import torch

    # A T4 has no bf16: the preset's 'auto' gives fp16 there, so force fp16 here (CPU test: fp32, no fp16 AMP on CPU).
    kw: dict[str, Any] = {"model_id": st.ctx["t4_dir"], "dtype": "float16" if torch.cuda.is_available() else "float32"}
    if st.sizes["t4_max_length"]:
        kw["max_length"] = st.sizes["t4_max_length"]
    return get_preset("t4", **kw)


def part_t4_build(st: State) -> dict[str, Any]:
    import torch

    info = build_model_dir(st, "qwen15-shaped", "qwen2", QWEN15, "float16" if torch.cuda.is_available() else "float32")
    st.ctx["t4_dir"] = info["dir"]
    st.ctx["t4_n_params"] = info["n_params"]
    return info


def part_t4_load_generate(st: State) -> dict[str, Any]:
    """a. 4-bit load; b. pair generation as build_pairs does it (generate_batches with the preset's settings)."""
    from mipo_lib.generate import GenerationStats, chat_prompt_ids, generate_batches
    from mipo_lib.tasks import get_task

    preset = t4_preset(st)
    s = st.sizes
    out: dict[str, Any] = {"preset": {k: getattr(preset, k) for k in (
        "model_id", "dtype", "load_in_4bit", "gradient_checkpointing", "lora_r", "lora_alpha", "lora_target_modules",
        "batch_size", "grad_accum", "max_length", "gen_batch_size", "score_batch_size", "max_new_tokens",
        "temperature", "top_p")}}
    model, tok, load_info = load(st, preset)
    out["load"] = load_info
    st.results["parts"]["t4_load_generate"] = out
    log(f"t4 load: footprint {load_info['memory_footprint_mb']} MB, {load_info['memory']}, 4-bit {load_info['is_4bit']}")
    st.write()

    task = get_task(preset.task)
    prompts = [task.prompt(e) for e in task.examples("train", s["t4_gen_prompts"], seed=0)]
    ids = [chat_prompt_ids(tok, p) for p in prompts]
    kw = dict(max_new_tokens=s["t4_new_tokens"], temperature=preset.temperature, top_p=preset.top_p,
              batch_size=preset.gen_batch_size, progress=False)
    for _ in generate_batches(model, tok, ids[:2], **{**kw, "max_new_tokens": s["warm_new"]}):  # warm-up
        pass
    clean()
    stats = GenerationStats()
    sync()
    start = time.perf_counter()
    texts = []
    for _, t in generate_batches(model, tok, ids, seed=0, stats=stats, **kw):
        texts += t
    sync()
    wall = time.perf_counter() - start
    out["generation"] = {
        "prompts": len(ids), "max_new_tokens": s["t4_new_tokens"], "batch_size": preset.gen_batch_size,
        "prompt_tokens_min_max_mean": [min(map(len, ids)), max(map(len, ids)), round(sum(map(len, ids)) / len(ids), 1)],
        "new_tokens": stats.new_tokens, "all_ran_to_max": stats.new_tokens == len(ids) * s["t4_new_tokens"],
        "generate_s": round(stats.seconds, 3), "wall_s": round(wall, 3), "tokens_per_s": round(stats.tokens_per_s, 1),
        "memory": mem(), "weights_allocated_before_mib": load_info["memory"].get("allocated_mib"),
    }
    log(f"t4 generation: {out['generation']}")
    st.results["parts"]["t4_load_generate"] = out
    st.write()

    # Reference scoring as build_pairs runs it (sequence_logprobs, score batch 8): realistic length, then worst case.
    real_pairs, real = synth_pairs(model, tok, preset, 8, s["t4_real_resp_words"])
    out["scoring_realistic_256_words"] = real
    log(f"t4 scoring (realistic, ~{s['t4_real_resp_words']} words): {real['scoring_s']} s, {real['memory']}")
    st.write()
    n_pairs = s["t4_steps"] * preset.batch_size * preset.grad_accum
    pairs, worst = synth_pairs(model, tok, preset, n_pairs, preset.max_length + 64)
    out["scoring_worst_case_max_length"] = worst
    log(f"t4 scoring (worst case, {worst['sequence_tokens_min_max']} tokens): {worst['scoring_s']} s, {worst['memory']}")
    st.ctx["t4_pairs"] = pairs
    st.ctx["t4_model"], st.ctx["t4_tok"] = model, tok
    return out


def part_t4_dpo(st: State, reuse: bool) -> dict[str, Any]:
    preset = t4_preset(st)
    pairs = st.ctx["t4_pairs"]
    model, tok = st.ctx.pop("t4_model", None), st.ctx.pop("t4_tok", None)
    reload_info = None
    if model is None:  # a model that already carries an adapter from an earlier run must not get a second one
        model, tok, reload_info = load(st, preset)
    clean()
    # QLoRA + gradient checkpointing: fwd 2N + recompute 2N + input grads 2N = ~6N/token (+2N with a reference fwd)
    res = run_dpo(st, model, tok, pairs, preset, reuse, st.ctx["t4_n_params"], 6.0 if reuse else 8.0,
                  f"t4_dpo_{'reuse' if reuse else 'trl_default'}")
    res["reload"] = reload_info
    del model
    clean()
    return res


def part_gen_speedup(st: State) -> dict[str, Any]:
    """Batched vs naive generation and the scoring roof (benchmarks/run.py's bench_generation, GPU-sized)."""
    import torch

    from mipo_lib.config import get_preset
    from mipo_lib.generate import GenerationStats, chat_prompt_ids, generate_batches
    from mipo_lib.scoring import sequence_logprobs
    from mipo_lib.tasks import get_task

    s = st.sizes
    dt = "bfloat16" if torch.cuda.is_available() else "float32"
    info = build_model_dir(st, "smollm2-shaped", "llama", SMOLLM135, dt)
    preset = get_preset("cpu", model_id=info["dir"], dtype=dt)
    model, tok, load_info = load(st, preset)
    out: dict[str, Any] = {"model": info, "load": load_info, "dtype": dt, "temperature": preset.temperature,
                           "top_p": preset.top_p}
    task = get_task(preset.task)
    big = [task.prompt(e) for e in task.examples("train", seed=0)[: s["gen_big_prompts"]]]
    prompts = big[: s["gen_prompts"]]
    ids = [chat_prompt_ids(tok, p) for p in prompts]
    kw = dict(max_new_tokens=s["gen_new"], temperature=preset.temperature, top_p=preset.top_p, seed=0, progress=False)
    # warm-up: one batched and one naive call, one scoring call
    for _ in generate_batches(model, tok, ids[:4], batch_size=4, **{**kw, "max_new_tokens": s["warm_new"]}):
        pass
    for _ in generate_batches(model, tok, ids[:1], batch_size=1, **{**kw, "max_new_tokens": s["warm_new"]}):
        pass
    sequence_logprobs(model, tok, prompts[:4], ["hello there"] * 4, batch_size=4)
    clean()

    batched = GenerationStats()
    texts = [""] * len(ids)
    sync()
    t = time.perf_counter()
    for batch, txt in generate_batches(model, tok, ids, batch_size=preset.gen_batch_size, stats=batched, **kw):
        for r, x in zip(batch.rows, txt):
            texts[r] = x
    sync()
    out["batched"] = {"prompts": len(ids), "batch_size": preset.gen_batch_size, "new_tokens": batched.new_tokens,
                      "seconds": round(batched.seconds, 3), "wall_s": round(time.perf_counter() - t, 3),
                      "tokens_per_s": round(batched.tokens_per_s, 1), "memory": mem()}
    log(f"gen batched: {out['batched']}")
    st.results["parts"]["gen_speedup"] = out
    st.write()

    naive = GenerationStats()
    t = time.perf_counter()
    done = 0
    for b in range(min(s["gen_naive"], len(ids))):
        for _ in generate_batches(model, tok, [ids[b]], batch_size=1, stats=naive, **kw):
            pass
        done += 1
        if time.perf_counter() - t > s["gen_naive_max_s"]:
            break
    out["naive"] = {"prompts": done, "new_tokens": naive.new_tokens, "seconds": round(naive.seconds, 3),
                    "tokens_per_s": round(naive.tokens_per_s, 1)}
    log(f"gen naive: {out['naive']}")
    clean()
    sync()
    t = time.perf_counter()
    _, n_tok = sequence_logprobs(model, tok, prompts, texts, batch_size=preset.score_batch_size)
    sync()
    score_s = time.perf_counter() - t
    out["scoring"] = {"sequences": len(prompts), "batch_size": preset.score_batch_size,
                      "completion_tokens": int(n_tok.sum()), "seconds": round(score_s, 4),
                      "tokens_per_s": round(float(n_tok.sum()) / score_s, 1), "memory": mem()}
    out["generation_vs_naive"] = round(batched.tokens_per_s / naive.tokens_per_s, 2)
    out["generation_vs_scoring"] = round(batched.tokens_per_s / out["scoring"]["tokens_per_s"], 4)
    out["goals"] = {"generation_vs_naive >= 8": out["generation_vs_naive"] >= 8,
                    "generation_vs_scoring >= 0.30": out["generation_vs_scoring"] >= 0.30}
    log(f"gen: scoring {out['scoring']}, batched/naive {out['generation_vs_naive']}x, "
        f"batched/scoring {out['generation_vs_scoring']}")
    st.results["parts"]["gen_speedup"] = out
    st.write()

    # Larger batch: how far batching goes on this device (same settings, more prompts in one batch).
    if st.left() > 20:
        big_ids = [chat_prompt_ids(tok, p) for p in big]
        clean()
        stats = GenerationStats()
        for _ in generate_batches(model, tok, big_ids, batch_size=len(big_ids), stats=stats, **kw):
            pass
        out["batched_large"] = {"prompts": len(big_ids), "batch_size": len(big_ids), "new_tokens": stats.new_tokens,
                                "seconds": round(stats.seconds, 3), "tokens_per_s": round(stats.tokens_per_s, 1),
                                "vs_naive": round(stats.tokens_per_s / naive.tokens_per_s, 2),
                                "vs_scoring": round(stats.tokens_per_s / out["scoring"]["tokens_per_s"], 4),
                                "memory": mem()}
        log(f"gen batched large: {out['batched_large']}")
    del model
    clean()
    return out


def paper_preset(st: State, **extra: Any) -> Any:
    import torch

    from mipo_lib.config import get_preset

    kw: dict[str, Any] = {"model_id": st.ctx["paper_dir"], **extra}
    if not torch.cuda.is_available():
        kw["dtype"] = "float32"
    if st.sizes["paper_max_length"]:
        kw["max_length"] = st.sizes["paper_max_length"]
    return get_preset("paper", **kw)


def part_paper(st: State, gradient_checkpointing: bool = False) -> dict[str, Any]:
    import torch

    if "paper_dir" not in st.ctx:
        info = build_model_dir(st, "llama1b-shaped", "llama", LLAMA1B,
                               "bfloat16" if torch.cuda.is_available() else "float32")
        st.ctx["paper_dir"], st.ctx["paper_n_params"] = info["dir"], info["n_params"]
    else:
        info = {"dir": st.ctx["paper_dir"], "reused": True}
    preset = paper_preset(st, **({"gradient_checkpointing": True} if gradient_checkpointing else {}))
    out: dict[str, Any] = {"model": info, "preset": {k: getattr(preset, k) for k in (
        "model_id", "dtype", "load_in_4bit", "gradient_checkpointing", "lora_r", "lora_alpha", "batch_size",
        "grad_accum", "max_length", "score_batch_size")}}
    key = "paper_gc" if gradient_checkpointing else "paper"
    model, tok, load_info = load(st, preset)
    out["load"] = load_info
    st.results["parts"][key] = out
    log(f"paper load: {load_info}")
    if "paper_pairs" not in st.ctx:
        n_pairs = st.sizes["paper_steps"] * preset.batch_size * preset.grad_accum
        pairs, scoring = synth_pairs(model, tok, preset, n_pairs, preset.max_length + 64)
        st.ctx["paper_pairs"] = pairs
        out["scoring_worst_case_max_length"] = scoring
        log(f"paper scoring (worst case): {scoring['scoring_s']} s, {scoring['memory']}")
    st.write()
    clean()  # drop the scoring's cached blocks so the DPO's reserved peak is its own
    # bf16 LoRA: fwd 2N + input grads 2N = ~4N/token (no recompute without gradient checkpointing)
    out["dpo"] = run_dpo(st, model, tok, st.ctx["paper_pairs"], preset, True, st.ctx["paper_n_params"],
                         6.0 if gradient_checkpointing else 4.0, "paper_dpo" + ("_gc" if gradient_checkpointing else ""))
    del model
    clean()
    return out


def part_t4_long_prompts(st: State) -> dict[str, Any]:
    """README's generation worst case: 32 prompts of ~1024 tokens + 256 new tokens (KV cache of 32 x 1,280)."""
    from mipo_lib.generate import GenerationStats, chat_prompt_ids, generate_batches

    import numpy as np

    preset = t4_preset(st)
    s = st.sizes
    model, tok, load_info = load(st, preset)
    rng = np.random.default_rng(1)
    prompts = [[{"role": "user", "content": words_text(s["t4_long_prompt_words"], rng)}] for _ in range(s["t4_gen_prompts"])]
    ids = [chat_prompt_ids(tok, p)[: preset.max_length] for p in prompts]
    clean()
    stats = GenerationStats()
    for _ in generate_batches(model, tok, ids, max_new_tokens=s["t4_new_tokens"], temperature=preset.temperature,
                              top_p=preset.top_p, batch_size=preset.gen_batch_size, seed=0, stats=stats, progress=False):
        pass
    out = {"prompts": len(ids), "prompt_tokens_min_max": [min(map(len, ids)), max(map(len, ids))],
           "max_new_tokens": s["t4_new_tokens"], "new_tokens": stats.new_tokens, "seconds": round(stats.seconds, 3),
           "tokens_per_s": round(stats.tokens_per_s, 1), "memory": mem(),
           "weights_allocated_mib": load_info["memory"].get("allocated_mib")}
    log(f"t4 long-prompt generation: {out}")
    del model
    clean()
    return out


def part_t4_build_pairs(st: State) -> dict[str, Any]:
    """pairs.build_pairs end to end (generate positives and context-drop negatives, score, store) for 32 prompts."""
    from mipo_lib.pairs import build_pairs, load_manifest
    from mipo_lib.tasks import get_task

    n = st.sizes["t4_gen_prompts"]
    preset = t4_preset(st).with_overrides(n_train_prompts=n, max_new_tokens=st.sizes["t4_new_tokens"])
    model, tok, load_info = load(st, preset)
    clean()
    sync()
    start = time.perf_counter()
    pairs = build_pairs(model, tok, get_task(preset.task), preset, seed=0, redo=True, progress=False)
    sync()
    out = {"n_prompts": n, "n_pairs": len(pairs), "wall_s": round(time.perf_counter() - start, 2),
           "manifest": load_manifest(preset, 0), "memory": mem(),
           "chosen_tokens_min_max": [min(p["chosen_tokens"] for p in pairs), max(p["chosen_tokens"] for p in pairs)]}
    log(f"t4 build_pairs: {out['wall_s']} s, {out['memory']}, manifest {out['manifest']}")
    del model
    clean()
    return out


# ------------------------------------------------------------------------------------------------------ summary
def _g(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def summarize(st: State) -> dict[str, Any]:
    p = st.results["parts"]
    s: dict[str, Any] = {}
    t4 = p.get("t4_load_generate", {})
    rows = {
        "t4 4-bit load": _g(t4, "load", "memory"),
        "t4 generation 32x256": _g(t4, "generation", "memory"),
        "t4 scoring realistic (score batch 8)": _g(t4, "scoring_realistic_256_words", "memory"),
        "t4 scoring worst case 1024 (score batch 8)": _g(t4, "scoring_worst_case_max_length", "memory"),
        "t4 DPO reuse_reference=True (setup+sanity eval)": _g(p, "t4_dpo_reuse", "memory_setup_and_sanity_eval"),
        "t4 DPO reuse_reference=True (training)": _g(p, "t4_dpo_reuse", "memory_training"),
        "t4 DPO TRL default (setup+sanity eval)": _g(p, "t4_dpo_trl_default", "memory_setup_and_sanity_eval"),
        "t4 DPO TRL default (training)": _g(p, "t4_dpo_trl_default", "memory_training"),
        "t4 generation, ~1024-token prompts": _g(p, "t4_long_prompts", "memory"),
        "t4 build_pairs end to end (32 prompts)": _g(p, "t4_build_pairs", "memory"),
    }
    s["t4_peaks_mib"] = {k: {"peak_allocated": v.get("peak_allocated_mib"), "peak_reserved": v.get("peak_reserved_mib"),
                             "t4": _band(v.get("peak_reserved_mib"))}
                         for k, v in rows.items() if isinstance(v, dict) and "peak_reserved_mib" in v}
    if s["t4_peaks_mib"]:
        # the preset's own pipeline; the two worst-case probes (1024-token scoring, 1024-token prompts) are reported
        # per row but cannot occur with 256-token responses and the task's ~60-token prompts
        probes = ("t4 scoring worst case 1024 (score batch 8)", "t4 generation, ~1024-token prompts")
        pipe = {k: v for k, v in s["t4_peaks_mib"].items() if k not in probes} or s["t4_peaks_mib"]
        worst = max(pipe.items(), key=lambda kv: kv[1]["peak_reserved"])
        pr = worst[1]["peak_reserved"]
        s["t4_verdict"] = (f"largest peak reserved of the preset's stages (DPO at the full max_length 1024): {pr:.0f} MiB "
                           f"({pr * MiB / 1e9:.2f} GB) in '{worst[0]}': {_band(pr)} on a 16 GB T4 (~{T4_TOTAL_MIB} MiB "
                           "visible to torch, minus ~300-450 MiB CUDA context; fit threshold 14.5e9 B = 13,828 MiB)")
        s["readme_vs_measured_gb"] = {
            "4-bit load (README ~1.2 GB)": _gb(_g(t4, "load", "memory", "allocated_mib")),
            "generation (README ~2 GB)": _gb(_g(t4, "generation", "memory", "peak_reserved_mib")),
            "QLoRA DPO training (README ~3-4 GB)": _gb(_g(p, "t4_dpo_reuse", "memory_training", "peak_reserved_mib")),
        }
    for tag in ("t4_dpo_reuse", "t4_dpo_trl_default"):
        if tag in p:
            s[tag] = {k: p[tag].get(k) for k in ("median_step_s_after_first", "tokens_per_s", "mfu_6N",
                                                  "mfu_est_actual", "peak_reserved_mib", "initial_sanity")}
    if "t4_dpo_reuse" in p and "t4_dpo_trl_default" in p:
        a, b = p["t4_dpo_reuse"]["median_step_s_after_first"], p["t4_dpo_trl_default"]["median_step_s_after_first"]
        s["t4_step_time_reuse_vs_default"] = round(a / b, 3) if a and b else None
    g = p.get("gen_speedup", {})
    if "generation_vs_naive" in g:
        s["generation"] = {"batched_tok_s": g["batched"]["tokens_per_s"], "naive_tok_s": g["naive"]["tokens_per_s"],
                           "scoring_tok_s": g["scoring"]["tokens_per_s"], "vs_naive": g["generation_vs_naive"],
                           "vs_scoring": g["generation_vs_scoring"], "goals": g["goals"],
                           "batched_large": g.get("batched_large")}
    for tag in ("paper", "paper_gc"):
        if tag in p and "dpo" in p[tag]:
            d = p[tag]["dpo"]
            s[tag] = {k: d.get(k) for k in ("median_step_s_after_first", "tokens_per_s", "mfu_6N", "mfu_est_actual",
                                             "peak_allocated_mib", "peak_reserved_mib")}
            s[tag]["scoring_peak_reserved_mib"] = _g(p[tag], "scoring_worst_case_max_length", "memory",
                                                     "peak_reserved_mib")
    return s


def _band(mib: Any) -> str:
    if not isinstance(mib, (int, float)):
        return "-"
    return "fits with margin" if mib < 13828 else "tight" if mib < 14700 else "does NOT fit"


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


def markdown(st: State) -> str:
    r = st.results
    p = r["parts"]
    env = p.get("env", {})
    s = r.get("summary", {})
    fh = env.get("trl_fused_lm_head", {})
    lines = [f"# MIPO GPU measurements ({'TINY test shapes, not results' if st.args.tiny else 'real shapes, random weights'})", "",
             f"- device: {env.get('device_name', 'cpu')} (sm {env.get('capability')}, {env.get('total_memory_mib')} MiB), "
             f"torch {_g(env, 'versions', 'torch')} CUDA {env.get('torch_cuda')}, CUDA context {env.get('context_overhead_mib')} MiB",
             f"- versions: {env.get('versions')}",
             f"- TRL fused LM head: ok={fh.get('fused_head_ok')}, triton {fh.get('triton_version')}"
             + (" -> Triton DISABLED, TRL torch tiles used (slower)" if fh.get("triton_disabled") else ""),
             f"- bitsandbytes 4-bit check: {env.get('bnb_4bit_ok')} {env.get('bnb_4bit_error') or ''}",
             f"- Triton disabled after a failure: {r['meta'].get('triton_disabled_after') or 'no'}",
             f"- elapsed {r['meta'].get('elapsed_s')} s (budget {st.args.budget} s); MFU peak: {env.get('peak_tflops_note')}", ""]
    if "t4_verdict" in s:
        lines += ["## t4 preset (Qwen2.5-1.5B-Instruct shape, 4-bit NF4 + double quant, fp16 compute, LoRA r16 all linear)", "",
                  f"**{s['t4_verdict']}**", "", "| stage | peak allocated MiB | peak reserved MiB | on a T4 |", "|---|---|---|---|"]
        lines += [f"| {k} | {_fmt(v['peak_allocated'])} | {_fmt(v['peak_reserved'])} | {v['t4']} |" for k, v in s["t4_peaks_mib"].items()]
        lines += ["", "README estimate vs measured (GB = 1e9 B; load: allocated after load; others: peak reserved):", ""]
        lines += [f"- {k}: **{v} GB**" for k, v in s.get("readme_vs_measured_gb", {}).items()]
        t4 = p.get("t4_load_generate", {})
        if t4.get("load"):
            lines += [f"- load: memory_footprint_mb {t4['load'].get('memory_footprint_mb')}, {t4['load'].get('load_s')} s, "
                      f"dtypes {t4['load'].get('param_dtypes')}"]
        if t4.get("generation"):
            g = t4["generation"]
            lines += [f"- generation: {g['prompts']} prompts x {g['max_new_tokens']} new tokens (batch {g['batch_size']}): "
                      f"{_fmt(g['tokens_per_s'])} tok/s, {g['generate_s']} s, all ran to max: {g['all_ran_to_max']}"]
        lines += [""]
    rows = []
    for tag, label in (("t4_dpo_reuse", "t4 QLoRA DPO, reference reused"), ("t4_dpo_trl_default", "t4 QLoRA DPO, TRL reference fwd"),
                       ("paper", "paper bf16 LoRA r64 DPO"), ("paper_gc", "paper + gradient checkpointing")):
        d = p.get(tag, {}).get("dpo") if tag.startswith("paper") else p.get(tag)
        if d:
            rows.append(f"| {label} | {d.get('batch_size')}x{d.get('grad_accum')}, {d.get('max_length')} | {d.get('optimizer_steps')} | "
                        f"{_fmt(d.get('median_step_s_after_first'))} | {_fmt(d.get('tokens_per_s'))} | {_fmt(d.get('mfu_6N'))} | "
                        f"{_fmt(d.get('mfu_est_actual'))} | {_fmt(d.get('peak_allocated_mib'))} | {_fmt(d.get('peak_reserved_mib'))} | "
                        f"{_fmt(_g(d, 'memory_training', 'peak_reserved_mib'))} | {_fmt(_g(d, 'initial_sanity', 'loss'))} |")
    if rows:
        lines += ["## DPO (dpo.train_dpo)", "",
                  "| run | batch x accum, max_length | steps | s/step (median, after 1st) | tokens/s | MFU 6N | MFU est. actual | "
                  "peak alloc MiB (incl. sanity eval) | peak reserved MiB | training-only peak reserved MiB | initial loss |",
                  "|---|---|---|---|---|---|---|---|---|---|---|", *rows, "",
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
        lines += [""]
    g = p.get("gen_speedup", {})
    if "generation_vs_naive" in g:
        lines += ["## Generation vs naive vs scoring (SmolLM2-135M shape, bf16, cpu-preset sampling)", "",
                  "| measure | tokens/s |", "|---|---|",
                  f"| batched generate_batches, {g['batched']['prompts']} prompts, batch {g['batched']['batch_size']} | {_fmt(g['batched']['tokens_per_s'])} |",
                  f"| naive, one prompt at a time ({g['naive']['prompts']} prompts) | {_fmt(g['naive']['tokens_per_s'])} |",
                  f"| teacher-forced scoring (sequence_logprobs, batch {g['scoring']['batch_size']}) | {_fmt(g['scoring']['tokens_per_s'])} |"]
        if g.get("batched_large"):
            b = g["batched_large"]
            lines += [f"| batched, {b['prompts']} prompts in one batch | {_fmt(b['tokens_per_s'])} |"]
        lines += ["", f"batched / naive = **{g['generation_vs_naive']}x** (goal >= 8); batched / scoring = "
                  f"**{g['generation_vs_scoring']}** (goal >= 0.30)", ""]
    for tag in ("t4_long_prompts", "t4_build_pairs"):
        if tag in p:
            d = {k: v for k, v in p[tag].items() if k != "manifest"}
            lines += [f"- {tag}: {d}"]
            if tag == "t4_build_pairs":
                m = p[tag].get("manifest", {})
                lines += [f"  manifest: generation {m.get('generation_seconds')} s at {m.get('generation_tokens_per_s')} tok/s, "
                          f"scoring {m.get('scoring_seconds')} s for {m.get('scored_tokens')} tokens"]
    if r["errors"]:
        lines += ["", "## Errors", ""] + [f"- {k}: {v.strip().splitlines()[-1] if v else v}" for k, v in r["errors"].items()]
    if r["skipped"]:
        lines += ["", "## Skipped", ""] + [f"- {k}: {v}" for k, v in r["skipped"].items()]
    lines += ["", "Full numbers: gpu_results.json. Random weights, real architectures: memory numbers transfer to other "
              "GPUs (within the CUDA context and kernel workspaces); times and MFU are for this device only."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="scale every shape down (CPU test)")
    ap.add_argument("--budget", type=float, default=270.0, help="seconds after which no new part starts")
    ap.add_argument("--workdir", default="/tmp/mipo-gpu-work")
    ap.add_argument("--only", default="", help="comma-separated part names to run (default: all)")
    args = ap.parse_args()
    st = State(args)
    st.results["meta"].update({"argv": sys.argv, "tiny": args.tiny, "budget_s": args.budget,
                               "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "sizes": st.sizes})
    log(f"measure.py start; OUT={st.out}; tiny={args.tiny}; budget={args.budget}s")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)

    # (name, function, rough seconds on an H200, what it needs from earlier parts)
    plan: list[tuple[str, Callable[[], Any], float, tuple[str, ...]]] = [
        ("env", lambda: part_env(st), 5, ()),
        ("t4_build", lambda: part_t4_build(st), 20, ()),
        ("t4_load_generate", lambda: part_t4_load_generate(st), 40, ("t4_dir",)),
        ("t4_dpo_reuse", lambda: triton_fallback(st, "t4_dpo_reuse", lambda: part_t4_dpo(st, True)), 40, ("t4_pairs",)),
        ("gen_speedup", lambda: part_gen_speedup(st), 45, ()),
        ("paper", lambda: triton_fallback(st, "paper", lambda: part_paper(st)), 45, ()),
        ("t4_dpo_trl_default", lambda: triton_fallback(st, "t4_dpo_trl_default", lambda: part_t4_dpo(st, False)), 45,
         ("t4_pairs",)),
        ("t4_long_prompts", lambda: part_t4_long_prompts(st), 25, ("t4_dir",)),
        ("t4_build_pairs", lambda: part_t4_build_pairs(st), 30, ("t4_dir",)),
        ("paper_gc", lambda: triton_fallback(st, "paper_gc", lambda: part_paper(st, gradient_checkpointing=True)), 30,
         ("paper_pairs",)),
    ]
    keep_partial = ("t4_load_generate", "gen_speedup", "paper", "paper_gc")  # these store sub-results as they go
    only = {x for x in args.only.split(",") if x}
    for name, fn, est, needs in plan:
        if only and name not in only and name != "env":
            continue
        missing = [n for n in needs if n not in st.ctx]
        if missing:
            st.results["skipped"][name] = f"needs {missing} from an earlier part"
            log(f"skip {name}: needs {missing}")
            continue
        if st.left() < (0 if args.tiny else est):
            st.results["skipped"][name] = f"time: {st.left():.0f} s left, part needs ~{est:.0f} s"
            log(f"skip {name}: {st.results['skipped'][name]}")
            continue
        if name != "t4_dpo_reuse" and st.ctx.pop("t4_model", None) is not None:  # never let it inflate later peaks
            st.ctx.pop("t4_tok", None)
            clean()
        log(f"=== {name} (est {est:.0f} s, {st.left():.0f} s left)")
        start = time.perf_counter()
        try:
            res = fn()
            res = res if isinstance(res, dict) else {"result": res}
            res["part_wall_s"] = round(time.perf_counter() - start, 1)
            st.results["parts"][name] = res
        except KeyboardInterrupt:
            st.results["errors"][name] = "interrupted (outer timeout)\n" + traceback.format_exc()
            log(f"{name}: interrupted after {time.perf_counter() - start:.1f}s; writing partial results")
            if name not in keep_partial:
                st.results["parts"].pop(name, None)
            st.write()
            return 130
        except BaseException:  # noqa: BLE001 - a failing part is a finding, not the end of the run
            tb = traceback.format_exc()
            st.results["errors"][name] = tb
            log(f"{name} FAILED after {time.perf_counter() - start:.1f}s:\n{tb}")
            if name not in keep_partial:
                st.results["parts"].pop(name, None)
            clean()
        st.write()
    st.write()
    log(f"done in {time.perf_counter() - T0:.1f}s; report ({st.out / 'gpu_results.md'}):")
    print(markdown(st), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
