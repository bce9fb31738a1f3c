#!/usr/bin/env python3
"""GPU measurements of the workbook's presets in one call, with the library's own functions (mipo_lib).

    bash benchmarks/gpu/run.sh --only priority      # on a GPU machine: see README.md beside this file
    OUT=/tmp/gpuout python benchmarks/gpu/measure.py --tiny    # every shape scaled down: a CPU check, about a minute

The real architectures with random weights (built from configs in code: nothing is downloaded; memory and speed do
not depend on the weights). Parts, in priority order; each is caught on its own and the results are written to $OUT
(gpu_results.json, gpu_results.md) after every part:

  env                    versions (and how they differ from the project's pins), device, CUDA context, 4-bit check
  t4_build               a Qwen2.5-1.5B-Instruct-shaped checkpoint for the `t4` preset
  t4_load_generate       the `t4` preset with its automatic dtype (hardware.select_dtype: fp16 on a T4, bf16 on an
                         H100/H200): 4-bit NF4 load; pair generation (32 prompts x 256 new tokens, batch 32); reference
                         scoring (score batch 8) at a realistic and at the worst-case length
  t4_dpo_reuse           QLoRA DPO (dpo.train_dpo) on synthetic pairs that fill max_length 1024, stored reference
  t4_fp16_load_generate  the same two in float16, as a T4 runs the preset (skipped where the automatic dtype is
  t4_fp16_dpo_reuse      float16 already: it was measured above)
  paper_gc               the `paper` preset (Llama-3.2-1B-Instruct shape, LoRA r64, batch 4, max_length 1536) with
                         gradient checkpointing
  gen_speedup            batched vs one-prompt-at-a-time generation and teacher-forced scoring (SmolLM2-135M shape)
  paper                  the `paper` preset as written (no gradient checkpointing)
  t4_dpo_trl_default     t4 DPO with TRL's reference forward instead of the stored reference log-probs
  t4_long_prompts        generation from ~1024-token prompts (the README's 32 x 1,280 KV-cache case)
  t4_build_pairs         pairs.build_pairs end to end for 32 prompts

--only takes part names and groups (a part's prerequisites come with it):
  priority = t4 + paper_gc (what the next GPU session runs first, about 4 minutes of an H100/H200)
  t4       = t4_build, t4_load_generate, t4_dpo_reuse, t4_fp16_load_generate, t4_fp16_dpo_reuse
  extras   = gen_speedup, paper, t4_dpo_trl_default, t4_long_prompts, t4_build_pairs
Parts start only while --budget allows their rough cost; an outer `timeout -s INT` leaves partial results.
Random weights almost never emit EOS, so every generation runs to max_new_tokens (the worst case).
Memory: torch.cuda peak allocated/reserved, peaks reset before each part (CUDA context not included; measured once).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HOME", "/tmp/mipo-gpu-hf")
os.environ.setdefault("HF_DATASETS_CACHE", "/tmp/mipo-gpu-hf/datasets")
os.environ.setdefault("TRITON_CACHE_DIR", "/tmp/mipo-gpu-triton")

import torch  # noqa: E402

from report import T4_VARIANTS, markdown, summarize  # noqa: E402  (report.py, beside this file)

T0 = time.perf_counter()
HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
#: What prepare.sh writes (wheels, tokenizer); run.sh sets MIPO_GPU_BUNDLE to it.
BUNDLE = Path(os.environ.get("MIPO_GPU_BUNDLE") or ROOT / "benchmarks" / "out" / "gpu")
MiB = 2**20
# Dense fp16/bf16 tensor-core peak (no sparsity), by device name; used for MFU only.
PEAK_TFLOPS = [("H200", 989.4), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.4), ("A100", 312.0),
               ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0), ("T4", 65.0)]
#: The dtype each t4 variant asks for (report.T4_VARIANTS names them).
T4_DTYPES = {"t4": "auto", "t4_fp16": "float16"}


@dataclass
class Throughput:
    """Generated tokens and the seconds spent generating them (what the library's GenerationStats counts)."""

    new_tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else float("nan")

    def __add__(self, other: Throughput) -> Throughput:
        return Throughput(self.new_tokens + other.new_tokens, self.seconds + other.seconds)


# ======================================================================================= the library, in one place
# Every use of mipo_lib is in this section, imports included: when a signature changes, adapt it here alone.
from mipo_lib import dpo  # noqa: E402
from mipo_lib.config import Preset, cache_dir, get_preset  # noqa: E402
from mipo_lib.files import write_text  # noqa: E402
from mipo_lib.generate import GenerationStats, chat_prompt_ids, generate_batches  # noqa: E402
from mipo_lib.hardware import select_device, select_dtype  # noqa: E402
from mipo_lib.models import BUNDLED_DIRNAME, check_4bit_backend, is_4bit, load_for_preset, memory_footprint_mb  # noqa: E402
from mipo_lib.pairs import build_pairs, load_manifest  # noqa: E402
from mipo_lib.scoring import pair_tokens, sequence_logprobs, token_digest  # noqa: E402
from mipo_lib.tasks import get_task  # noqa: E402
from mipo_lib.workbook.environment import version_mismatches  # noqa: E402


def lib_write_text(path: Path, text: str) -> None:
    """Results appear whole or not at all (`files.write_text`): an outer timeout may stop the script mid-write."""
    write_text(path, text)


def lib_preset(name: str, **overrides: Any) -> Preset:
    """A preset as the workbook builds it (`config.get_preset`), for one epoch: steps = pairs / (batch x accum)."""
    return get_preset(name, epochs=1, **overrides)


def lib_device() -> torch.device:
    return select_device()


def lib_dtype(requested: str) -> str:
    """The dtype `hardware.select_dtype` gives a preset's `dtype` on this machine ("auto" included)."""
    return str(select_dtype(lib_device(), requested)).removeprefix("torch.")


def lib_load(preset: Preset, **overrides: Any) -> tuple[Any, Any]:
    return load_for_preset(preset, **overrides)


def lib_model_info(model: Any, preset: Preset) -> dict[str, Any]:
    return {"memory_footprint_mb": round(memory_footprint_mb(model), 1),
            "is_4bit": bool(is_4bit(model)) if preset.load_in_4bit else False,
            "training_precision": dpo.precision_flags(model)}


def lib_check_4bit() -> None:
    check_4bit_backend(lib_device())


def lib_pin_mismatches() -> list[str]:
    return version_mismatches()


def lib_bundled_tokenizer() -> Path:
    """Where `make setup` put the bundled SmolLM2 (its tokenizer goes on every random-weight model here)."""
    return cache_dir() / BUNDLED_DIRNAME


def lib_train_examples(preset: Preset, n: int | None = None, balanced: bool = False) -> list[dict[str, Any]]:
    """Training examples of the preset's task as {id, group, prompt}: `balanced` takes the task's seeded balanced
    subset of n (requests x preferences), else the first n in order (personalization has 300)."""
    task = get_task(preset.task)
    examples = task.examples("train", n, seed=0) if balanced else task.examples("train", seed=0)[:n]
    return [{"id": e.id, "group": task.group(e), "prompt": task.prompt(e)} for e in examples]


def lib_prompt_ids(tok: Any, prompt: Any) -> list[int]:
    """A prompt's tokens as generation sees them (chat template + assistant header)."""
    return chat_prompt_ids(tok, prompt)


def lib_prompt_length(tok: Any, prompt: Any) -> int:
    """A prompt's tokens as scoring and TRL see them (`scoring.pair_tokens`)."""
    return len(pair_tokens(tok, prompt, "x")[0])


def lib_generate(model: Any, tok: Any, prompt_ids: list[list[int]], *, max_new_tokens: int, temperature: float,
                 top_p: float, batch_size: int) -> tuple[list[str], Throughput]:
    """Replies in prompt order, sampled as build_pairs samples them (`generate.generate_batches`), and the throughput."""
    stats = GenerationStats()
    texts = [""] * len(prompt_ids)
    for batch, replies in generate_batches(model, tok, prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                                           top_p=top_p, batch_size=batch_size, seed=0, stats=stats, progress=False):
        for row, text in zip(batch.rows, replies):
            texts[row] = text
    return texts, Throughput(stats.new_tokens, stats.seconds)


def lib_score(model: Any, tok: Any, prompts: list[Any], responses: list[str], *, max_length: int | None,
              batch_size: int) -> tuple[Any, Any]:
    """Summed reference log-probs and completion token counts (`scoring.sequence_logprobs`, as build_pairs scores)."""
    return sequence_logprobs(model, tok, prompts, responses, max_length=max_length, batch_size=batch_size)


def lib_pair(tok: Any, example: dict[str, Any], chosen: str, rejected: str, logps: tuple[float, float],
             lengths: tuple[int, int], max_length: int) -> dict[str, Any]:
    """One pair in build_pairs' format (the fields train_dpo reads), the prompt's own reply against a synthetic one."""
    def digest(reply: str) -> str:
        return token_digest(*pair_tokens(tok, example["prompt"], reply, max_length))

    return {"pair_id": f"{example['id']}-n0", "example_id": example["id"], "group": example["group"],
            "negative_source": "synthetic", "prompt": example["prompt"], "negative_prompt": example["prompt"],
            "chosen": chosen, "rejected": rejected, "ref_chosen_logps": float(logps[0]), "ref_rejected_logps": float(logps[1]),
            "chosen_tokens": int(lengths[0]), "rejected_tokens": int(lengths[1]),
            "chosen_token_digest": digest(chosen), "rejected_token_digest": digest(rejected)}


def lib_train_dpo(model: Any, tok: Any, pairs: list[dict[str, Any]], preset: Preset, adapter_dir: Path, reuse: bool,
                  callback: Any, on_trainer: Callable[[Any], None]) -> dict[str, Any]:
    """`dpo.train_dpo` as the workbook runs it, with a transformers `callback` added to its trainer and
    `on_trainer(trainer)` called once the trainer is set up, and what its result says. train_dpo takes no callbacks,
    so they are attached in `dpo._prepare`, the set-up step it runs before training (restored afterwards)."""
    original = dpo._prepare

    def prepare(trainer: Any, progress: bool) -> None:
        original(trainer, progress)
        trainer.add_callback(callback)
        on_trainer(trainer)

    dpo._prepare = prepare
    try:
        res = dpo.train_dpo(model, tok, pairs, preset, 0, adapter_dir, reuse_reference=reuse, redo=True, progress=False)
    finally:
        dpo._prepare = original
    history = res.log
    return {"trainer_seconds": round(res.seconds, 2), "initial_sanity": res.sanity,
            "losses": [round(float(x), 4) for x in history["loss"].tolist()] if "loss" in history else None,
            "reward_accuracies": [round(float(x), 3) for x in history["rewards/accuracies"].tolist()]
            if "rewards/accuracies" in history else None,
            "lora_changed_fraction": sum(res.lora_changed.values()) / len(res.lora_changed) if res.lora_changed else None}


def lib_build_pairs(model: Any, tok: Any, preset: Preset) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """`pairs.build_pairs` end to end for seed 0 (redone), and the manifest it writes (timings, token counts)."""
    pairs = build_pairs(model, tok, get_task(preset.task), preset, seed=0, redo=True, progress=False)
    return pairs, load_manifest(preset, 0)


# ================================================================================================ shapes, sizes
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


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


# ======================================================================================================== state
class PartSkipped(Exception):
    """A part that has nothing to measure here (the reason goes to the results' `skipped`)."""


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
        self.done: set[str] = set()

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def write(self) -> None:
        self.results["meta"]["elapsed_s"] = round(time.perf_counter() - T0, 1)
        try:
            self.results["summary"] = summarize(self.results)
        except Exception as exc:  # noqa: BLE001 - a summary bug must not lose the measurements
            self.results["summary"] = {"error": repr(exc)}
        lib_write_text(self.out / "gpu_results.json", json.dumps(self.results, indent=1, default=_json_default))
        try:
            lib_write_text(self.out / "gpu_results.md", markdown(self.results))
        except Exception as exc:  # noqa: BLE001
            lib_write_text(self.out / "gpu_results.md", f"markdown failed: {exc!r}\n")


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
    except Exception:  # noqa: BLE001
        pass
    return repr(o)


# =============================================================================================== device helpers
def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def clean() -> None:
    """Free what can be freed and reset the peak counters, so the next part's peaks are its own."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def mem() -> dict[str, float]:
    """Current and peak memory (MiB): torch.cuda counters on a GPU, process RSS on a CPU."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        st = torch.cuda.memory_stats()
        free, total = torch.cuda.mem_get_info()
        return {
            "allocated_mib": round(torch.cuda.memory_allocated() / MiB, 1),
            "reserved_mib": round(torch.cuda.memory_reserved() / MiB, 1),
            "peak_allocated_mib": round(torch.cuda.max_memory_allocated() / MiB, 1),
            "peak_reserved_mib": round(torch.cuda.max_memory_reserved() / MiB, 1),
            "alloc_retries": int(st.get("num_alloc_retries", 0)),
            "ooms": int(st.get("num_ooms", 0)),
            "device_used_now_mib": round((total - free) / MiB, 1),
        }
    import psutil

    return {"rss_mib": round(psutil.Process().memory_info().rss / MiB, 1)}


def peak_tflops() -> tuple[float | None, str]:
    if not torch.cuda.is_available():
        return None, "cpu"
    name = torch.cuda.get_device_name()
    for key, tf in PEAK_TFLOPS:
        if key in name:
            return tf, f"{name}: assumed {tf} dense fp16/bf16 TFLOPS (no sparsity; {key} table entry)"
    return None, f"{name}: unknown peak"


def runnable_dtype(requested: str) -> tuple[str, str | None]:
    """The dtype to run a part asking for `requested` in, and why it differs: fp16 mixed precision trains on GPUs
    only, so the CPU check runs float16 parts in float32 (their plumbing, not their precision, is checked there)."""
    if requested == "float16" and not torch.cuda.is_available():
        return "float32", "CPU check: float16 runs as float32"
    return requested, None


def dtype_record(asked: str, preset: Preset, note: str | None = None) -> dict[str, Any]:
    """What a part asked for and what it ran in (hardware.select_dtype's answer on this machine)."""
    return {"requested": asked, "resolved": lib_dtype(preset.dtype), **({"note": note} if note else {})}


# ================================================================================================== model dirs
def tokenizer_dir(st: State) -> Path:
    """The SmolLM2 chat tokenizer: --tokenizer, else the bundle's (prepare.sh), else the one `make setup` cached."""
    candidates = [Path(st.args.tokenizer)] if st.args.tokenizer else [BUNDLE / "tok", lib_bundled_tokenizer()]
    for tok in candidates:
        if (tok / "tokenizer.json").exists():
            return tok
    raise SystemExit(f"no tokenizer.json in {', '.join(map(str, candidates))}: run `make setup` (or prepare.sh) first")


def build_model_dir(st: State, name: str, family: str, shape: dict[str, Any], dtype_name: str) -> dict[str, Any]:
    """A random-weight checkpoint of a real architecture (config made in code) + the SmolLM2 chat tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    target = st.work / name
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    tok_dir = tokenizer_dir(st)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    kw = dict(shape)
    if st.args.tiny:
        kw.update(TINY_DIMS, vocab_size=len(tok))  # the LM head over 150k rows would dominate the CPU check
        if family == "qwen2":
            kw.pop("head_dim", None)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if family == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    config = cfg_cls(**kw, **ids)
    start = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(lib_device()):
        model = model_cls(config).to(getattr(torch, dtype_name))
    n_params = sum(p.numel() for p in model.parameters())
    n_embed = model.get_input_embeddings().weight.numel()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(target)
    for f in tok_dir.iterdir():
        if f.is_file() and f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(f, target / f.name)
    del model
    clean()
    info = {"dir": str(target), "family": family, "n_params": n_params, "n_embedding_params": n_embed,
            "config": dict(kw), "dtype_saved": dtype_name, "tokenizer": str(tok_dir),
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


def synth_pairs(model: Any, tok: Any, preset: Preset, n: int, resp_words: int,
                seed: int = 0) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """MIPO-format pairs on real task prompts with synthetic responses of `resp_words` words; reference log-probs,
    token counts and token digests come from the library's scoring, as in build_pairs."""
    import numpy as np

    examples = lib_train_examples(preset, n)
    rng = np.random.default_rng(seed)
    prompts = [e["prompt"] for e in examples]
    chosen = [words_text(resp_words, rng) for _ in examples]
    rejected = [words_text(resp_words, rng) for _ in examples]
    info: dict[str, Any] = {"n_pairs": n, "response_words": resp_words, "max_length": preset.max_length,
                            "score_batch_size": preset.score_batch_size}
    clean()
    sync()
    start = time.perf_counter()
    logps, lengths = lib_score(model, tok, prompts + prompts, chosen + rejected, max_length=preset.max_length,
                               batch_size=preset.score_batch_size)
    sync()
    secs = time.perf_counter() - start
    prompt_lens = [lib_prompt_length(tok, p) for p in prompts]
    total_tokens = sum(prompt_lens) * 2 + int(lengths.sum())
    info.update({"scoring_s": round(secs, 3), "completion_tokens": int(lengths.sum()), "total_tokens": total_tokens,
                 "completion_tokens_per_s": round(float(lengths.sum()) / secs, 1),
                 "total_tokens_per_s": round(total_tokens / secs, 1),
                 "prompt_tokens_min_max": [min(prompt_lens), max(prompt_lens)],
                 "sequence_tokens_min_max": [min(p + int(c) for p, c in zip(prompt_lens * 2, lengths)),
                                             max(p + int(c) for p, c in zip(prompt_lens * 2, lengths))],
                 "memory": mem()})
    pairs = [lib_pair(tok, e, chosen[j], rejected[j], (logps[j], logps[n + j]), (lengths[j], lengths[n + j]),
                      preset.max_length) for j, e in enumerate(examples)]
    info["tokens_per_pair"] = [prompt_lens[j] * 2 + int(lengths[j]) + int(lengths[n + j]) for j in range(n)]
    return pairs, info


# ====================================================================================================== DPO run
def run_dpo(st: State, model: Any, tok: Any, pairs: list[dict[str, Any]], preset: Preset, reuse: bool, n_base: int,
            flops_mult: float, tag: str) -> dict[str, Any]:
    """dpo.train_dpo with a step timer and memory probes attached (lib_train_dpo); train_dpo itself unchanged."""
    from transformers import TrainerCallback

    class Probe(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.begin: float | None = None
            self.pre_train: dict[str, float] | None = None
            self.train_mem: dict[str, float] | None = None
            self.trainable: dict[str, Any] | None = None

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

    def count_parameters(trainer: Any) -> None:
        params = list(trainer.model.parameters())
        train = [p for p in params if p.requires_grad]
        probe.trainable = {"trainable_params": sum(p.numel() for p in train),
                           "trainable_dtypes": sorted({str(p.dtype) for p in train}),
                           "frozen_param_dtypes": sorted({str(p.dtype) for p in params if not p.requires_grad})}

    adapter_dir = st.work / f"adapter-{tag}"
    shutil.rmtree(adapter_dir, ignore_errors=True)
    try:
        sync()
        start = time.perf_counter()
        res = lib_train_dpo(model, tok, pairs, preset, adapter_dir, reuse, probe, count_parameters)
        sync()
        wall = time.perf_counter() - start
    except BaseException:
        # keep what the probe saw (an OOM or a timeout mid-training is itself a measurement)
        st.results["parts"][f"{tag}_partial"] = {
            "step_ends_s": [round(t - probe.begin, 3) for t in probe.ends] if probe.begin else [],
            "memory_setup_and_sanity_eval": probe.pre_train, "memory_now": _safe(mem), **(probe.trainable or {})}
        raise
    steps = [b - a for a, b in zip([probe.begin] + probe.ends[:-1], probe.ends)] if probe.begin else []
    n_steps = len(steps)
    tokens_total = sum(int(p["chosen_tokens"]) + int(p["rejected_tokens"]) for p in pairs) + \
        sum(2 * lib_prompt_length(tok, p["prompt"]) for p in pairs)
    tokens_per_step = tokens_total / max(1, n_steps)
    steady = sorted(steps[1:]) if n_steps > 1 else steps
    s_step = steady[len(steady) // 2] if steady else float("nan")
    peak_tf, peak_note = peak_tflops()
    out: dict[str, Any] = {
        "reuse_reference": reuse, "n_pairs": len(pairs), "optimizer_steps": n_steps,
        "batch_size": preset.batch_size, "grad_accum": preset.grad_accum, "max_length": preset.max_length,
        "gradient_checkpointing": preset.gradient_checkpointing, "lora_r": preset.lora_r,
        "train_dpo_wall_s": round(wall, 2), "trainer_seconds": res["trainer_seconds"],
        "first_step_s": round(steps[0], 3) if steps else None,
        "median_step_s_after_first": round(s_step, 3),
        "mean_step_s_after_first": round(sum(steps[1:]) / max(1, n_steps - 1), 3) if n_steps > 1 else None,
        "step_s_all": [round(s, 3) for s in steps],
        "tokens_per_step": tokens_per_step,
        "tokens_per_s": round(tokens_per_step / s_step, 1) if s_step == s_step else None,
        "initial_sanity": res["initial_sanity"],
        "memory_setup_and_sanity_eval": probe.pre_train,
        "memory_training": probe.train_mem,
        **(probe.trainable or {}),
        **{k: res[k] for k in ("losses", "reward_accuracies", "lora_changed_fraction")},
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
        f"MFU(6N) {out.get('mfu_6N')}, sanity {res['initial_sanity']}, dtype {lib_dtype(preset.dtype)}")
    return out


def _safe(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except BaseException as exc:  # noqa: BLE001
        return repr(exc)


def load(st: State, preset: Preset) -> tuple[Any, Any, dict[str, Any]]:
    """The preset's model through the library's loader, timed, with its footprint and dtypes."""
    clean()
    sync()
    start = time.perf_counter()
    retry_error = None
    try:
        model, tok = lib_load(preset)
    except Exception as exc:  # noqa: BLE001 - a GPU-only failure of the project's loader is a finding; try once more
        if not torch.cuda.is_available():
            raise
        retry_error = repr(exc)[-600:]
        log(f"load_for_preset failed on the GPU ({retry_error}); retrying with device='cuda:0'")
        clean()
        start = time.perf_counter()
        model, tok = lib_load(preset, device="cuda:0")
    sync()
    info = {"load_s": round(time.perf_counter() - start, 2), **lib_model_info(model, preset),
            "first_load_error": retry_error, "param_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
            "device": str(next(model.parameters()).device), "memory": mem()}
    return model, tok, info


# ======================================================================================================= parts
def part_env(st: State) -> dict[str, Any]:
    import importlib.metadata as md

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

    info: dict[str, Any] = {"versions": vers, "pin_mismatches": lib_pin_mismatches(),
                            "transformers_module": transformers.__version__, "trl_module": trl.__version__,
                            "mipo_lib_file": mipo_lib.__file__, "python": platform.python_version(),
                            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "cuda_available": torch.cuda.is_available(), "auto_dtype": lib_dtype("auto")}
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
        lib_check_4bit()
        info["bnb_4bit_ok"] = True
    except Exception as exc:  # noqa: BLE001
        info["bnb_4bit_ok"] = False
        info["bnb_4bit_error"] = str(exc)
    log(f"env: {info.get('device_name', 'cpu')} | auto dtype {info['auto_dtype']} | {vers} | "
        f"not as pinned: {info['pin_mismatches']} | 4-bit ok: {info['bnb_4bit_ok']}")
    return info


def check_fused_lm_head() -> dict[str, Any]:
    """TRL 1.16's DPO computes log-probs with a fused LM head that runs Triton kernels on CUDA (JIT-compiled: needs a
    working Triton + C compiler). Try it on a toy model; if it fails, switch TRL to its torch tiles and say so."""
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
        dev = lib_device()
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


def t4_preset(st: State, variant: str, **extra: Any) -> tuple[Preset, dict[str, Any]]:
    """The `t4` preset on the Qwen-shaped checkpoint in the variant's dtype (and `extra` settings), and the dtype
    record of the part."""
    dtype, note = runnable_dtype(T4_DTYPES[variant])
    kw: dict[str, Any] = {"model_id": st.ctx["t4_dir"], "dtype": dtype, **extra}
    if st.sizes["t4_max_length"]:
        kw["max_length"] = st.sizes["t4_max_length"]
    preset = lib_preset("t4", **kw)
    return preset, dtype_record(T4_DTYPES[variant], preset, note)


def part_t4_build(st: State) -> dict[str, Any]:
    info = build_model_dir(st, "qwen15-shaped", "qwen2", QWEN15, "float16" if torch.cuda.is_available() else "float32")
    st.ctx["t4_dir"] = info["dir"]
    st.ctx["t4_n_params"] = info["n_params"]
    return info


def part_t4_load_generate(st: State, variant: str) -> dict[str, Any]:
    """a. 4-bit load; b. pair generation as build_pairs does it; c. reference scoring, realistic and worst case."""
    preset, dtype = t4_preset(st, variant)
    if variant != "t4" and lib_dtype(T4_DTYPES[variant]) == lib_dtype("auto"):  # a T4: "auto" is float16 there
        raise PartSkipped(f"the automatic dtype is {lib_dtype('auto')} on this device too: t4_load_generate measured it")
    s = st.sizes
    name = f"{variant}_load_generate"
    out: dict[str, Any] = {"dtype": dtype, "preset": {k: getattr(preset, k) for k in (
        "model_id", "dtype", "load_in_4bit", "gradient_checkpointing", "lora_r", "lora_alpha", "lora_target_modules",
        "batch_size", "grad_accum", "max_length", "gen_batch_size", "score_batch_size", "max_new_tokens",
        "temperature", "top_p")}}
    model, tok, load_info = load(st, preset)
    out["load"] = load_info
    st.results["parts"][name] = out
    log(f"{variant} load ({dtype}): footprint {load_info['memory_footprint_mb']} MB, {load_info['memory']}, "
        f"4-bit {load_info['is_4bit']}")
    st.write()

    ids = [lib_prompt_ids(tok, e["prompt"]) for e in lib_train_examples(preset, s["t4_gen_prompts"], balanced=True)]
    kw = dict(max_new_tokens=s["t4_new_tokens"], temperature=preset.temperature, top_p=preset.top_p,
              batch_size=preset.gen_batch_size)
    lib_generate(model, tok, ids[:2], **{**kw, "max_new_tokens": s["warm_new"]})  # warm-up
    clean()
    sync()
    start = time.perf_counter()
    _, stats = lib_generate(model, tok, ids, **kw)
    sync()
    wall = time.perf_counter() - start
    out["generation"] = {
        "prompts": len(ids), "max_new_tokens": s["t4_new_tokens"], "batch_size": preset.gen_batch_size,
        "prompt_tokens_min_max_mean": [min(map(len, ids)), max(map(len, ids)), round(sum(map(len, ids)) / len(ids), 1)],
        "new_tokens": stats.new_tokens, "all_ran_to_max": stats.new_tokens == len(ids) * s["t4_new_tokens"],
        "generate_s": round(stats.seconds, 3), "wall_s": round(wall, 3), "tokens_per_s": round(stats.tokens_per_s, 1),
        "memory": mem(), "weights_allocated_before_mib": load_info["memory"].get("allocated_mib"),
    }
    log(f"{variant} generation: {out['generation']}")
    st.write()

    # Reference scoring as build_pairs runs it (sequence_logprobs, score batch 8): realistic length, then worst case.
    _, real = synth_pairs(model, tok, preset, 8, s["t4_real_resp_words"])
    out["scoring_realistic_256_words"] = real
    log(f"{variant} scoring (realistic, ~{s['t4_real_resp_words']} words): {real['scoring_s']} s, {real['memory']}")
    st.write()
    n_pairs = s["t4_steps"] * preset.batch_size * preset.grad_accum
    pairs, worst = synth_pairs(model, tok, preset, n_pairs, preset.max_length + 64)
    out["scoring_worst_case_max_length"] = worst
    log(f"{variant} scoring (worst case, {worst['sequence_tokens_min_max']} tokens): {worst['scoring_s']} s, {worst['memory']}")
    st.ctx[f"{variant}_pairs"] = pairs
    st.ctx["handoff"] = (f"{variant}_dpo_reuse", model, tok)  # the next part trains this model; others drop it
    return out


def part_t4_dpo(st: State, variant: str, reuse: bool) -> dict[str, Any]:
    preset, dtype = t4_preset(st, variant)
    pairs = st.ctx[f"{variant}_pairs"]
    _, model, tok = st.ctx.pop("handoff", (None, None, None))
    reload_info = None
    if model is None:  # a model that already carries an adapter from an earlier run must not get a second one
        model, tok, reload_info = load(st, preset)
    clean()
    # QLoRA + gradient checkpointing: fwd 2N + recompute 2N + input grads 2N = ~6N/token (+2N with a reference fwd)
    res = run_dpo(st, model, tok, pairs, preset, reuse, st.ctx["t4_n_params"], 6.0 if reuse else 8.0,
                  f"{variant}_dpo_{'reuse' if reuse else 'trl_default'}")
    res["dtype"] = dtype
    res["reload"] = reload_info
    del model
    clean()
    return res


def part_gen_speedup(st: State) -> dict[str, Any]:
    """Batched vs naive generation and the scoring roof (benchmarks/run.py's bench_generation, GPU-sized), with the
    cpu preset's sampling and automatic dtype."""
    s = st.sizes
    dt = lib_dtype("auto")
    info = build_model_dir(st, "smollm2-shaped", "llama", SMOLLM135, dt)
    preset = lib_preset("cpu", model_id=info["dir"])
    model, tok, load_info = load(st, preset)
    out: dict[str, Any] = {"model": info, "load": load_info, "dtype": dtype_record("auto", preset),
                           "temperature": preset.temperature, "top_p": preset.top_p}
    examples = lib_train_examples(preset, s["gen_big_prompts"])
    big = [e["prompt"] for e in examples]
    prompts = big[: s["gen_prompts"]]
    ids = [lib_prompt_ids(tok, p) for p in prompts]
    kw = dict(max_new_tokens=s["gen_new"], temperature=preset.temperature, top_p=preset.top_p)
    # warm-up: one batched and one naive call, one scoring call
    lib_generate(model, tok, ids[:4], batch_size=4, **{**kw, "max_new_tokens": s["warm_new"]})
    lib_generate(model, tok, ids[:1], batch_size=1, **{**kw, "max_new_tokens": s["warm_new"]})
    lib_score(model, tok, prompts[:4], ["hello there"] * 4, max_length=None, batch_size=4)
    clean()

    sync()
    t = time.perf_counter()
    texts, batched = lib_generate(model, tok, ids, batch_size=preset.gen_batch_size, **kw)
    sync()
    out["batched"] = {"prompts": len(ids), "batch_size": preset.gen_batch_size, "new_tokens": batched.new_tokens,
                      "seconds": round(batched.seconds, 3), "wall_s": round(time.perf_counter() - t, 3),
                      "tokens_per_s": round(batched.tokens_per_s, 1), "memory": mem()}
    log(f"gen batched: {out['batched']}")
    st.results["parts"]["gen_speedup"] = out
    st.write()

    naive = Throughput()
    t = time.perf_counter()
    done = 0
    for b in range(min(s["gen_naive"], len(ids))):
        naive += lib_generate(model, tok, [ids[b]], batch_size=1, **kw)[1]
        done += 1
        if time.perf_counter() - t > s["gen_naive_max_s"]:
            break
    out["naive"] = {"prompts": done, "new_tokens": naive.new_tokens, "seconds": round(naive.seconds, 3),
                    "tokens_per_s": round(naive.tokens_per_s, 1)}
    log(f"gen naive: {out['naive']}")
    clean()
    sync()
    t = time.perf_counter()
    _, n_tok = lib_score(model, tok, prompts, texts, max_length=None, batch_size=preset.score_batch_size)
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
        big_ids = [lib_prompt_ids(tok, p) for p in big]
        clean()
        _, stats = lib_generate(model, tok, big_ids, batch_size=len(big_ids), **kw)
        out["batched_large"] = {"prompts": len(big_ids), "batch_size": len(big_ids), "new_tokens": stats.new_tokens,
                                "seconds": round(stats.seconds, 3), "tokens_per_s": round(stats.tokens_per_s, 1),
                                "vs_naive": round(stats.tokens_per_s / naive.tokens_per_s, 2),
                                "vs_scoring": round(stats.tokens_per_s / out["scoring"]["tokens_per_s"], 4),
                                "memory": mem()}
        log(f"gen batched large: {out['batched_large']}")
    del model
    clean()
    return out


def part_paper(st: State, gradient_checkpointing: bool = False) -> dict[str, Any]:
    """The `paper` preset (its automatic dtype: bf16 on an H100/H200): worst-case reference scoring, then DPO."""
    if "paper_dir" not in st.ctx:
        info = build_model_dir(st, "llama1b-shaped", "llama", LLAMA1B,
                               "bfloat16" if torch.cuda.is_available() else "float32")
        st.ctx["paper_dir"], st.ctx["paper_n_params"] = info["dir"], info["n_params"]
    else:
        info = {"dir": st.ctx["paper_dir"], "reused": True}
    kw: dict[str, Any] = {"model_id": st.ctx["paper_dir"], "gradient_checkpointing": gradient_checkpointing}
    if st.sizes["paper_max_length"]:
        kw["max_length"] = st.sizes["paper_max_length"]
    preset = lib_preset("paper", **kw)
    out: dict[str, Any] = {"model": info, "dtype": dtype_record(preset.dtype, preset), "preset": {k: getattr(preset, k) for k in (
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
    import numpy as np

    preset, dtype = t4_preset(st, "t4")
    s = st.sizes
    model, tok, load_info = load(st, preset)
    rng = np.random.default_rng(1)
    prompts = [[{"role": "user", "content": words_text(s["t4_long_prompt_words"], rng)}] for _ in range(s["t4_gen_prompts"])]
    ids = [lib_prompt_ids(tok, p)[: preset.max_length] for p in prompts]
    clean()
    _, stats = lib_generate(model, tok, ids, max_new_tokens=s["t4_new_tokens"], temperature=preset.temperature,
                            top_p=preset.top_p, batch_size=preset.gen_batch_size)
    out = {"dtype": dtype, "prompts": len(ids), "prompt_tokens_min_max": [min(map(len, ids)), max(map(len, ids))],
           "max_new_tokens": s["t4_new_tokens"], "new_tokens": stats.new_tokens, "seconds": round(stats.seconds, 3),
           "tokens_per_s": round(stats.tokens_per_s, 1), "memory": mem(),
           "weights_allocated_mib": load_info["memory"].get("allocated_mib")}
    log(f"t4 long-prompt generation: {out}")
    del model
    clean()
    return out


def part_t4_build_pairs(st: State) -> dict[str, Any]:
    """pairs.build_pairs end to end (generate positives and context-drop negatives, score, store) for 32 prompts."""
    n = st.sizes["t4_gen_prompts"]
    preset, dtype = t4_preset(st, "t4", n_train_prompts=n, max_new_tokens=st.sizes["t4_new_tokens"])
    model, tok, load_info = load(st, preset)
    clean()
    sync()
    start = time.perf_counter()
    pairs, manifest = lib_build_pairs(model, tok, preset)
    sync()
    out = {"dtype": dtype, "n_prompts": n, "n_pairs": len(pairs), "wall_s": round(time.perf_counter() - start, 2),
           "manifest": manifest, "memory": mem(),
           "chosen_tokens_min_max": [min(p["chosen_tokens"] for p in pairs), max(p["chosen_tokens"] for p in pairs)]}
    log(f"t4 build_pairs: {out['wall_s']} s, {out['memory']}, manifest {out['manifest']}")
    del model
    clean()
    return out


# ================================================================================================= the plan
@dataclass(frozen=True)
class Part:
    name: str
    run: Callable[[State], dict[str, Any]]
    est_s: float  # rough seconds on an H100/H200: a part starts only if the budget has that much left
    needs: tuple[str, ...] = ()  # parts whose model folder or pairs it uses (run first, and must have succeeded)


PLAN: tuple[Part, ...] = (
    Part("env", part_env, 30),
    Part("t4_build", part_t4_build, 10),
    Part("t4_load_generate", lambda st: part_t4_load_generate(st, "t4"), 40, ("t4_build",)),
    Part("t4_dpo_reuse", lambda st: triton_fallback(st, "t4_dpo_reuse", lambda: part_t4_dpo(st, "t4", True)), 30,
         ("t4_load_generate",)),
    Part("t4_fp16_load_generate", lambda st: part_t4_load_generate(st, "t4_fp16"), 40, ("t4_build",)),
    Part("t4_fp16_dpo_reuse",
         lambda st: triton_fallback(st, "t4_fp16_dpo_reuse", lambda: part_t4_dpo(st, "t4_fp16", True)), 30,
         ("t4_fp16_load_generate",)),
    Part("paper_gc", lambda st: triton_fallback(st, "paper_gc", lambda: part_paper(st, gradient_checkpointing=True)), 40),
    Part("gen_speedup", part_gen_speedup, 45),
    Part("paper", lambda st: triton_fallback(st, "paper", lambda: part_paper(st)), 45),
    Part("t4_dpo_trl_default",
         lambda st: triton_fallback(st, "t4_dpo_trl_default", lambda: part_t4_dpo(st, "t4", False)), 45,
         ("t4_load_generate",)),
    Part("t4_long_prompts", part_t4_long_prompts, 25, ("t4_build",)),
    Part("t4_build_pairs", part_t4_build_pairs, 30, ("t4_build",)),
)
PARTS = {p.name: p for p in PLAN}
T4_GROUP = ("t4_build",) + tuple(f"{v}_{stage}" for v in T4_VARIANTS for stage in ("load_generate", "dpo_reuse"))
GROUPS: dict[str, tuple[str, ...]] = {
    "t4": T4_GROUP,
    "priority": T4_GROUP + ("paper_gc",),
    "extras": ("gen_speedup", "paper", "t4_dpo_trl_default", "t4_long_prompts", "t4_build_pairs"),
    "all": tuple(PARTS),
}
KEEP_PARTIAL = {"t4_load_generate", "t4_fp16_load_generate", "gen_speedup", "paper", "paper_gc"}  # store as they go


def selected_parts(only: str) -> list[str]:
    """The parts `--only` names (parts or GROUPS, comma-separated; empty: all) with their prerequisites, in PLAN's
    order; env always."""
    wanted = {"env"}
    for name in filter(None, (x.strip() for x in only.split(","))) if only else GROUPS["all"]:
        if name not in PARTS and name not in GROUPS:
            raise SystemExit(f"--only: unknown part {name!r}; parts: {', '.join(PARTS)}; groups: {', '.join(GROUPS)}")
        wanted |= set(GROUPS.get(name, (name,)))
    todo = list(wanted)
    while todo:
        for need in PARTS[todo.pop()].needs:
            if need not in wanted:
                wanted.add(need)
                todo.append(need)
    return [p.name for p in PLAN if p.name in wanted]


def run_part(st: State, part: Part) -> bool:
    """Run one part, storing its result, error or reason to skip; False when an outer timeout interrupted it."""
    failed = [n for n in part.needs if n not in st.done]
    if failed:
        st.results["skipped"][part.name] = f"needs {failed}, which failed or were skipped"
        log(f"skip {part.name}: {st.results['skipped'][part.name]}")
        return True
    if st.left() < (0 if st.args.tiny else part.est_s):
        st.results["skipped"][part.name] = f"time: {st.left():.0f} s left, part needs ~{part.est_s:.0f} s"
        log(f"skip {part.name}: {st.results['skipped'][part.name]}")
        return True
    handoff = st.ctx.get("handoff")
    if handoff and handoff[0] != part.name:  # a model kept for the next part must not inflate another part's peaks
        st.ctx.pop("handoff")
        del handoff
        clean()
    log(f"=== {part.name} (est {part.est_s:.0f} s, {st.left():.0f} s left)")
    start = time.perf_counter()
    try:
        res = part.run(st)
        res["part_wall_s"] = round(time.perf_counter() - start, 1)
        st.results["parts"][part.name] = res
        st.done.add(part.name)
    except PartSkipped as exc:
        st.results["skipped"][part.name] = str(exc)
        log(f"skip {part.name}: {exc}")
    except KeyboardInterrupt:
        st.results["errors"][part.name] = "interrupted (outer timeout)\n" + traceback.format_exc()
        log(f"{part.name}: interrupted after {time.perf_counter() - start:.1f}s; writing partial results")
        if part.name not in KEEP_PARTIAL:
            st.results["parts"].pop(part.name, None)
        return False
    except BaseException:  # noqa: BLE001 - a failing part is a finding, not the end of the run
        st.results["errors"][part.name] = traceback.format_exc()
        log(f"{part.name} FAILED after {time.perf_counter() - start:.1f}s:\n{st.results['errors'][part.name]}")
        if part.name not in KEEP_PARTIAL:
            st.results["parts"].pop(part.name, None)
        st.ctx.pop("handoff", None)
        clean()
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="scale every shape down (CPU check of the plumbing)")
    ap.add_argument("--budget", type=float, default=270.0, help="seconds after which no new part starts")
    ap.add_argument("--workdir", default="/tmp/mipo-gpu-work", help="random-weight checkpoints, adapters, pairs")
    ap.add_argument("--only", default="", help="comma-separated parts or groups (priority, t4, extras, all)")
    ap.add_argument("--tokenizer", default="", help="folder with the SmolLM2 tokenizer (default: the bundle's, "
                                                    "else the one `make setup` cached)")
    args = ap.parse_args()
    names = selected_parts(args.only)
    st = State(args)
    os.environ.setdefault("MIPO_RUNS_DIR", str(st.work / "runs"))  # build_pairs' output
    if args.tiny and not torch.cuda.is_available():
        torch.set_num_threads(1)  # tiny shapes on a shared CPU: one thread is several times faster than two
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    st.results["meta"].update({"argv": sys.argv, "tiny": args.tiny, "budget_s": args.budget, "parts_selected": names,
                               "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "sizes": st.sizes})
    log(f"measure.py start; OUT={st.out}; tiny={args.tiny}; budget={args.budget}s; parts {names}")
    for name in names:
        finished = run_part(st, PARTS[name])
        st.write()
        if not finished:
            return 130
    log(f"done in {time.perf_counter() - T0:.1f}s; report ({st.out / 'gpu_results.md'}):")
    print(markdown(st.results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
