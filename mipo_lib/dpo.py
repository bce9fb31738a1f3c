"""DPO (MIPO), the SFT baseline and the multi-negative InfoNCE objective through TRL with a PEFT LoRA adapter: the
only module that imports TRL.

Keeping every TRL call here means an API change touches one file, and `tests/test_api_drift.py` checks each keyword
argument built below against the installed signatures.

A method's `Training` (`mipo_lib.methods`: a training kind and its trainer arguments) is all this module needs: `train`
runs the kind's trainer (`train_dpo`, `train_sft`, `train_infonce`) with those arguments, and `adapter_key` is the one
cache key of the adapter it makes, built from the training, never from a method's name (docs/methods.md).

Choices that matter:
- The reference model is the base model with the adapter disabled (TRL does that for PEFT models): no second copy.
- Reference log-probs come from the pairs file (computed once, while building pairs, with the same tokenization):
  `precompute_ref_log_probs=True` tells TRL to read them from the batch, and `_PairsDPOTrainer` skips TRL's own
  precompute pass when the columns are already there. No reference forward pass runs during training.
- Sigmoid loss, summed log-probs, beta from the preset, as in the official code; but a constant learning rate after a
  short warm-up (`LR_SCHEDULE`; official: cosine to a minimum learning rate), so that the adapter after epoch e of a
  longer run *is* an e-epoch run: `make tune` trains each method once and evaluates its epoch snapshots
  (`snapshot_epochs`) on the validation split instead of training once per epoch count.
- On CPU the fused LM head scores only the reply positions (`compact_lm_head_on_cpu`), as TRL already does on GPUs.
- On CPU each pair's prompt runs through the model once per step, not once per reply (`shared_prompt`, hooked into
  TRL's loss by `_prompt_run_once`); not with gradient checkpointing, and not on GPUs (`shares_prompt`).
- Precision follows `hardware.select_dtype`: bf16 where supported, fp16 on a T4 (adapters kept in fp32), fp32 on CPUs
  without native bf16. With 4-bit the base stays NF4; only the LoRA matrices train.
- InfoNCE (`train_infonce`) is TRL's DPO trainer with its own loss over a prompt's K pairs (`infonce_loss`): the same
  data, forward, reference log-probs and schedule as DPO, batches of whole prompts (`GroupSampler`).
"""

from __future__ import annotations

import inspect
import json
import math
import shutil
import time
from contextlib import contextmanager
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import pandas as pd
import torch
from transformers.modeling_outputs import BaseModelOutputWithPast

from mipo_lib import cache, files, shared_prompt
from mipo_lib.config import Preset
from mipo_lib.errors import MipoError
from mipo_lib.hardware import select_device
from mipo_lib.methods import Training
from mipo_lib.models import lora_config, prepare_4bit_for_training
from mipo_lib.pairs import pairs_key
from mipo_lib.scoring import token_digest

DONE_MARKER = "training_done.json"
#: transformers' scheduler name. Constant after warm-up: the first e epochs of a run do not depend on how many follow
#: (with a cosine schedule the learning rate at epoch 2 depends on the total), so epoch snapshots equal shorter runs.
LR_SCHEDULE = "constant_with_warmup"


@dataclass
class TrainResult:
    """What a training run leaves behind (also read back when a finished run is reused)."""

    adapter_dir: Path
    log: pd.DataFrame
    seconds: float
    peak_memory_mb: float | None
    lora_changed: dict[str, bool] | None
    sanity: dict[str, float] | None
    reused: bool


# ------------------------------------------------------------------------------------------------------- datasets
def dpo_dataset(pairs: Sequence[dict[str, Any]], with_reference: bool = True) -> Any:
    """Conversational preference rows for TRL, carrying the base model's log-probs as reference log-probs."""
    from datasets import Dataset

    rows = {
        "prompt": [p["prompt"] for p in pairs],
        "chosen": [[{"role": "assistant", "content": p["chosen"]}] for p in pairs],
        "rejected": [[{"role": "assistant", "content": p["rejected"]}] for p in pairs],
    }
    if with_reference:
        rows["ref_chosen_logps"] = [float(p["ref_chosen_logps"]) for p in pairs]
        rows["ref_rejected_logps"] = [float(p["ref_rejected_logps"]) for p in pairs]
    return Dataset.from_dict(rows)


def sft_dataset(pairs: Sequence[dict[str, Any]]) -> Any:
    """Prompt-completion rows of the positives (one per prompt even when K > 1 negatives share it)."""
    from datasets import Dataset

    seen: dict[str, dict[str, Any]] = {}
    for p in pairs:
        seen.setdefault(p["example_id"], p)
    return Dataset.from_dict({
        "prompt": [p["prompt"] for p in seen.values()],
        "completion": [[{"role": "assistant", "content": p["chosen"]}] for p in seen.values()],
    })


# -------------------------------------------------------------------------------------------------------- configs
def precision_flags(model: Any) -> dict[str, bool]:
    """bf16/fp16 mixed-precision flags matching the model's compute dtype (TRL defaults bf16=True otherwise)."""
    dtype = _compute_dtype(model)
    return {"bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16}


def _compute_dtype(model: Any) -> torch.dtype:
    qcfg = getattr(model.config, "quantization_config", None)
    if qcfg is not None:
        compute = qcfg.get("bnb_4bit_compute_dtype") if isinstance(qcfg, dict) else getattr(qcfg, "bnb_4bit_compute_dtype", None)
        if compute is not None:
            return getattr(torch, str(compute).replace("torch.", "")) if not isinstance(compute, torch.dtype) else compute
    return next(p.dtype for p in model.parameters() if p.dtype.is_floating_point)


def warmup_steps(preset: Preset, n_rows: int) -> int:
    """Warm-up steps: `warmup_ratio` of one epoch's optimizer steps, rounded up (so at least one unless the ratio is
    0). A count of steps, not a ratio of the run, so that it does not change with the number of epochs
    (see `LR_SCHEDULE`)."""
    per_epoch = math.ceil(max(n_rows, 1) / (preset.batch_size * preset.grad_accum))
    return math.ceil(preset.warmup_ratio * per_epoch)


def common_args(preset: Preset, seed: int, output_dir: Path, model: Any, progress: bool, *, epochs: int, n_rows: int) -> dict[str, Any]:
    """Arguments shared by DPOConfig and SFTConfig (both are transformers TrainingArguments); `epochs` is the
    method's own (`preset.epochs` for DPO, `preset.sft_epochs` for SFT), `n_rows` the training rows (for warm-up)."""
    on_cpu = next(model.parameters()).device.type == "cpu"
    return {
        "output_dir": str(output_dir),
        "num_train_epochs": epochs,
        "per_device_train_batch_size": preset.batch_size,
        "gradient_accumulation_steps": preset.grad_accum,
        "max_length": preset.max_length,
        "lr_scheduler_type": LR_SCHEDULE,
        "warmup_steps": warmup_steps(preset, n_rows),
        "logging_steps": 1,
        "save_strategy": "epoch",
        "save_total_limit": 1,
        "report_to": report_to(preset),
        "seed": seed,
        "disable_tqdm": not progress,
        "use_cpu": on_cpu,
        "dataloader_pin_memory": not on_cpu,
        **precision_flags(model),
        # always explicit: TRL's configs default it to True, which would ignore the preset (and slow CPU runs)
        _checkpointing_key(): preset.gradient_checkpointing,
    }


def report_to(preset: Preset) -> str | list[str]:
    """The preset's loggers for transformers' `report_to`, checked to be installed now rather than at trainer start.

    transformers only notices a missing logger when the trainer is built, after the model is loaded; here the
    one-line error says which package to install or to set report_to=none.
    """
    if preset.report_to.strip() == "none":
        return "none"
    from transformers.integrations import get_available_reporting_integrations

    wanted = [name.strip() for name in preset.report_to.split(",") if name.strip()]
    missing = [name for name in wanted if name != "all" and name not in get_available_reporting_integrations()]
    if missing:
        raise MipoError(f"report_to={preset.report_to!r}: {', '.join(missing)} is not installed; pip install it or set report_to=none")
    return wanted


def _checkpointing_key() -> str:
    """transformers renamed `gradient_checkpointing` to `activation_checkpointing` (the old name warns)."""
    from transformers import TrainingArguments

    params = inspect.signature(TrainingArguments).parameters
    return "activation_checkpointing" if "activation_checkpointing" in params else "gradient_checkpointing"


def dpo_config_kwargs(
    preset: Preset, seed: int, output_dir: Path, model: Any, reuse_reference: bool = True, progress: bool = True, n_rows: int = 0,
    trainer_args: Mapping[str, Any] | None = None, evaluated: bool = False,
) -> dict[str, Any]:
    """Every keyword passed to `DPOConfig` (the API-drift test inspects this); `n_rows` pairs sets the warm-up;
    `evaluated`: an eval set is given, evaluated on a schedule (`evaluation_args`); `trainer_args` (a method's,
    `methods.Training`) are added last, over these."""
    return {
        **common_args(preset, seed, output_dir, model, progress, epochs=preset.epochs, n_rows=n_rows),
        "beta": preset.beta,
        "loss_type": ["sigmoid"],
        "learning_rate": preset.learning_rate,
        "precompute_ref_log_probs": reuse_reference,
        "disable_dropout": True,
        **(evaluation_args(preset, n_rows) if evaluated else {}),
        **(trainer_args or {}),
    }


def evals_per_epoch(epochs: int) -> int:
    """How often a run of `epochs` epochs evaluates its validation pairs: twice in a 1-epoch run (a curve of two
    points), once an epoch otherwise. Beside the untrained level (loss log 2, margin 0: the adapter starts as the
    identity), the plot's dotted line, that shows the 2-epoch default run's validation loss fall and rise again.

    Why not twice an epoch everywhere: on the cpu preset (60 training pairs, 20 validation pairs) each pass is a forward
    over a third as many pairs as an epoch trains on, without the backward pass: twice an epoch cost the five-seed
    reference run 6.3% of its wall time (the validation pairs once, 31 s, and 19.5 s of evaluation per seed)."""
    return 2 if epochs <= 1 else 1


def evaluation_args(preset: Preset, n_rows: int) -> dict[str, Any]:
    """TrainingArguments that evaluate the eval set `evals_per_epoch(preset.epochs)` times an epoch (every `eval_steps`
    optimizer steps, the last of an epoch included when the steps divide evenly), in batches of the training batch
    size."""
    per_epoch = math.ceil(max(n_rows, 1) / (preset.batch_size * preset.grad_accum))
    return {"eval_strategy": "steps", "eval_steps": max(1, math.ceil(per_epoch / evals_per_epoch(preset.epochs))),
            "per_device_eval_batch_size": preset.batch_size}


def sft_config_kwargs(
    preset: Preset, seed: int, output_dir: Path, model: Any, progress: bool = True, n_rows: int = 0,
    trainer_args: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Every keyword passed to `SFTConfig`: loss on the completion only, same LoRA and schedule as DPO, its own epochs
    (`trainer_args` added last, as in `dpo_config_kwargs`)."""
    return {
        **common_args(preset, seed, output_dir, model, progress, epochs=preset.sft_epochs, n_rows=n_rows),
        "learning_rate": preset.sft_learning_rate,
        "completion_only_loss": True,
        **(trainer_args or {}),
    }


# ------------------------------------------------------------------------------------------------------- trainers
def compact_lm_head_on_cpu() -> None:
    """Make TRL's fused LM head project only the positions that carry a label (the reply) on CPU, as it does on GPUs.

    Why: `trl.trainer.utils.add_fused_lm_head` compacts to the labelled positions only on Triton devices; elsewhere
    it scores every position, to keep tile shapes fixed for backends that compile per shape (AWS Neuron). On a CPU
    nothing is compiled, and pushing the prompt positions through the 49k-token vocabulary, forward and backward,
    cost a third or more of a DPO step on the `cpu` preset (measured in `benchmarks/results.md`).
    Rows are scored independently, so every labelled position's log-prob is unchanged (`tests/test_dpo.py` compares
    log-probs and gradients with the uncompacted head's). Only the compaction predicate changes: the kernel choice
    (Triton or torch tiles) lives in `trl.kernels.chunked_logprob` and keeps its own.
    """
    import trl.trainer.utils as trl_utils

    current = trl_utils._use_triton
    if hasattr(current, "trl_predicate"):
        return

    def compact(device: torch.device) -> bool:
        return device.type == "cpu" or current(device)

    compact.trl_predicate = current  # type: ignore[attr-defined]  # TRL's own, for measuring without (benchmarks)
    trl_utils._use_triton = compact


#: Rows of a fused-LM-head tile that TRL's torch fallback (CPU, MPS) transforms at once (`lm_head_tiles_in_row_blocks`).
LM_HEAD_ROW_BLOCK = 64


def lm_head_tiles_in_row_blocks() -> None:
    """Make TRL's torch fallback of the fused LM head (`_forward_tile`, `_backward_tile`, used where there is no
    Triton: CPUs, MPS) work through each logits tile `LM_HEAD_ROW_BLOCK` rows at a time.

    Why: a tile is every scored token of the batch x a 32,768-token slice of the vocabulary (about 65 MB in fp32 on
    the cpu preset), and the fallback's elementwise steps (scale, log-softmax, exp, the target mask, the gradient)
    each make a temporary of the tile's size, about ten alive at once in the backward pass: that was the training
    step's peak (`benchmarks/memory_stage.py train --saved` samples it in `_backward_tile`). Row blocks make those
    temporaries a block's size. The tile's matrix products (`torch.mm`, the gradient's `addmm`) still run on the whole
    tile, and every elementwise step and every per-row reduction computes each row from that row alone, so the
    log-probs, entropies and gradients are bit-identical (`tests/test_dpo.py` compares them through TRL's chunked
    function; seed 0's MIPO and SFT adapters of the cpu preset came out bit for bit the same,
    `benchmarks/results_stages.md`); only the memory changes. A smaller token tile (TRL's TOKEN_CHUNK_SIZE) would also cut it but changes the products' shapes,
    hence their rounding: measured, the adapter after 2 epochs differs (by up to 2.5e-6).
    """
    import trl.kernels.chunked_logprob as chunked

    for name in ("_forward_tile", "_backward_tile"):
        fold = getattr(chunked, name)
        if not hasattr(fold, "trl_fold"):
            setattr(chunked, name, _in_row_blocks(fold))


def _in_row_blocks(fold: Callable[..., Any]) -> Callable[..., Any]:
    """`fold(tile, *per_row_and_other_args)` called on row blocks of `tile` of even size (at most
    `LM_HEAD_ROW_BLOCK`), slicing every 1-d argument that has one entry per tile row (targets, running statistics,
    incoming gradients), passing the rest (strides, offsets, flags) unchanged."""

    def blocked(tile: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        n = tile.shape[0]
        blocks = math.ceil(n / LM_HEAD_ROW_BLOCK)
        if blocks <= 1:
            fold(tile, *args, **kwargs)
            return
        size = math.ceil(n / blocks)  # even blocks: no one-row tail
        for start in range(0, n, size):
            rows = slice(start, start + size)
            fold(tile[rows], *(a[rows] if isinstance(a, torch.Tensor) and a.dim() == 1 and a.shape[0] == n else a
                               for a in args), **kwargs)

    blocked.trl_fold = fold  # type: ignore[attr-defined]  # TRL's own, for measuring without (benchmarks, tests)
    return blocked


def _trainer_classes() -> tuple[type, type, type, type]:
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    compact_lm_head_on_cpu()
    lm_head_tiles_in_row_blocks()

    class FiniteLoss:
        """Stops the run at the first non-finite loss, before its backward pass: nothing of that step reaches the
        optimizer or a checkpoint (`check_finite_loss`). Training on NaN would look like a run and save a broken
        adapter; fp16 (a T4) is where it happens, Qwen2-family models being known to overflow there."""

        def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None) -> Any:
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,  # type: ignore[misc]
                                       num_items_in_batch=num_items_in_batch)
            check_finite_loss(out[0] if return_outputs else out, self.state.global_step + 1, self.model)  # type: ignore[attr-defined]
            return out

    class FiniteSFTTrainer(FiniteLoss, SFTTrainer):  # type: ignore[misc]
        """TRL's SFTTrainer that stops at a non-finite loss."""

    class PairsDPOTrainer(FiniteLoss, DPOTrainer):  # type: ignore[misc]
        """DPOTrainer that takes reference log-probs already present in the dataset instead of recomputing them, and
        runs each pair's prompt once (`shared_prompt`) where the batch allows it."""

        share_prompt: bool = True  # False: TRL's own forward (the tests compare the two)

        def evaluate(self, eval_dataset: Any = None, ignore_keys: Any = None, metric_key_prefix: str = "eval") -> Any:
            """TRL's evaluation; the scheduled one (of the eval set, `eval_dataset` None) leaves every random number
            generator as it found it (`_rng_untouched`), so that training is the same with or without it
            (a run with dropout draws its masks from the generator the evaluation dataloader draws a seed from)."""
            if eval_dataset is not None:
                return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
            with _rng_untouched():
                return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)

        def _precompute_ref_logps(self, dataset: Any, name: str, batch_size: int) -> Any:
            if {"ref_chosen_logps", "ref_rejected_logps"} <= set(dataset.column_names):
                return dataset
            return super()._precompute_ref_logps(dataset, name, batch_size)

        def _compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool) -> Any:
            checkpointing = getattr(self.args, _checkpointing_key(), False)
            if not (self.share_prompt and shares_prompt(checkpointing, inputs["input_ids"].device)):
                return self._pairs_loss(model, inputs, return_outputs)
            with _prompt_run_once(self.accelerator.unwrap_model(model), inputs["completion_mask"]):
                return self._pairs_loss(model, inputs, return_outputs)

        def _pairs_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool) -> Any:
            """The loss of a batch of pairs: TRL's (the InfoNCE trainer puts its own here)."""
            return super()._compute_loss(model, inputs, return_outputs)

    return DPOConfig, PairsDPOTrainer, SFTConfig, FiniteSFTTrainer


@contextmanager
def _rng_untouched() -> Iterator[None]:
    """Restore torch's (CPU and CUDA), numpy's and Python's random states on exit.

    Why: an evaluation draws from torch's global generator (its dataloader's base seed), from which a training run
    with dropout draws its masks: without this, merely evaluating would change such a run's adapter (every LoRA tensor
    of the smoke run with lora_dropout=0.2, tests/test_validation_curves.py). The order of the training pairs does
    not depend on it (accelerate seeds each epoch's shuffle)."""
    import random

    import numpy as np

    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def check_finite_loss(loss: torch.Tensor, step: int, model: Any) -> None:
    """Raise, in one line that names the fix, when a training step's loss is NaN or infinite (non-finite logits make
    it so too)."""
    if torch.isfinite(loss.detach()).all():
        return
    dtype = _compute_dtype(model)
    name = str(dtype).replace("torch.", "")
    fix = ("fp16 overflows easily (Qwen2-family models are known to): set dtype=float32, or bfloat16 on a GPU with "
           "native bf16" if dtype == torch.float16 else "lower learning_rate or check the pairs for empty replies")
    raise MipoError(f"step {step}: the training loss is {float(loss.detach().float().mean())} in {name}; the run stopped "
                    f"before this step's update (nothing of it was applied or saved): {fix}")


def shares_prompt(checkpointing: bool, device: torch.device) -> bool:
    """Whether DPO steps run each prompt once (`shared_prompt`): on CPU only, and not with gradient checkpointing.

    Why only on CPU: there it saves what it promises (cpu preset, fp32: 3.96 s instead of 4.70 s per step,
    `benchmarks/results.md`). On an H200 it made the `paper` preset's LoRA step twice as slow and uneven (median
    0.59 s against 0.28 s with TRL's forward, peak reserved 29 GB against 26 GB; `benchmarks/results_gpu.md`): a
    60-token prompt saves little against 1,470-token replies there, and the replies' pass over a key/value cache costs
    more than it saves. So GPUs keep TRL's own forward. Not with checkpointing: transformers turns the key/value
    cache off while checkpointing in training, and the replies' pass needs the prompts' cache."""
    return device.type == "cpu" and not checkpointing


def dpo_forward(preset: Preset) -> str:
    """How a DPO step runs its batch under `preset`, for the cache key: the float results of the two ways differ in
    rounding only, but a 120-step run amplifies rounding into a different trajectory, so a stored adapter is reused
    only under the way that made it."""
    return "shared-prompt" if shares_prompt(preset.gradient_checkpointing, select_device()) else "trl"


@contextmanager
def _prompt_run_once(model: Any, completion_mask: torch.Tensor) -> Iterator[None]:
    """While TRL computes one batch's loss, its calls of the transformer body go through `shared_prompt` (falling back
    to the body itself for any batch that does not have the pair layout, or any call with other arguments).

    TRL's fused LM head calls the body as `model.base_model(input_ids=..., attention_mask=..., use_cache=False)`
    (through PEFT, which adds `inputs_embeds=None` and other unset arguments);
    the body instance's `forward` is replaced for the duration of the batch and restored after."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = causal_lm.base_model
    original = body.forward
    own = body.__dict__.get("forward")

    def forward(input_ids: Any = None, attention_mask: Any = None, use_cache: Any = None, **kwargs: Any) -> Any:
        unset = all(value is None for value in kwargs.values())  # PEFT passes inputs_embeds=None and the like
        if unset and not use_cache and input_ids is not None and attention_mask is not None and input_ids.shape == completion_mask.shape:
            hidden = shared_prompt.hidden_states(original, input_ids, attention_mask, completion_mask)
            if hidden is not None:
                return BaseModelOutputWithPast(last_hidden_state=hidden)
        return original(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache, **kwargs)

    body.forward = forward
    try:
        yield
    finally:
        if own is None:
            del body.forward
        else:
            body.forward = own


def check_reference_tokens(trainer: Any, pairs: Sequence[dict[str, Any]], max_length: int, dataset: Any = None) -> None:
    """Fail loudly if TRL tokenized a pair differently from the scoring that produced its reference log-probs.

    Compares the exact token ids (through `scoring.token_digest`), not only their counts: a prompt that changed
    without changing length (a chat template that renders the date, an edited system message) is caught too.
    `dataset`: TRL's tokenized rows of `pairs` (default: the trainer's training set).
    """
    ds = trainer.train_dataset if dataset is None else dataset
    if len(ds) != len(pairs):
        raise MipoError(f"TRL dropped {len(pairs) - len(ds)} pairs whose prompt fills max_length; raise max_length in the preset")
    for row, pair in zip(ds, pairs):
        for side in ("chosen", "rejected"):
            n = max(0, min(len(row[f"{side}_ids"]), max_length - len(row["prompt_ids"])))
            stored = pair.get(f"{side}_token_digest")
            if stored is None:
                raise MipoError(f"pair {pair['pair_id']} has no token digest (made by an older version); regenerate pairs with redo=True")
            if n != pair[f"{side}_tokens"] or token_digest(row["prompt_ids"], row[f"{side}_ids"][:n]) != stored:
                raise MipoError(
                    f"pair {pair['pair_id']}: TRL's {side} tokens ({n}) differ from the tokens scoring used "
                    f"({pair[f'{side}_tokens']}); the stored reference log-probs do not match; regenerate pairs with redo=True"
                )


def _lora_snapshot(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def _quiet(trainer: Any, progress: bool) -> Any:
    """Without progress bars, transformers prints every log dict; keep notebooks and CI output readable."""
    if not progress:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    return trainer


def _keep_adapters_fp32(model: Any) -> None:
    """TRL casts QLoRA adapters to bf16; a T4 (fp16) or an fp32 CPU run wants them in fp32."""
    if _compute_dtype(model) != torch.bfloat16:
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()


def _peak_memory_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None


EVAL_PREFIX = "eval_"


def _log_frame(history: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per logged training step; with an eval set, its metrics (`eval_loss`, `eval_rewards/margins`,
    `eval_rewards/accuracies`, ...) on the row of the step after which they were measured (empty elsewhere)."""
    steps = pd.DataFrame([h for h in history if "loss" in h and "train_runtime" not in h])
    evals = [{k: v for k, v in h.items() if k.startswith(EVAL_PREFIX) or k == "step"} for h in history if "eval_loss" in h]
    if not evals or steps.empty:
        return steps
    return steps.merge(pd.DataFrame(evals), on="step", how="left", validate="one_to_one")


# ---------------------------------------------------------------------------------------- an adapter's cache key
#: The cache stage (`cache.STAGE_FIELDS`) whose preset fields each training kind reads: InfoNCE trains like DPO
#: (epochs, beta, learning rate); its K is the pairs' `k_negatives`, already in the pairs key.
_STAGE_OF = {"dpo": "dpo", "sft": "sft", "infonce": "dpo"}
_LABEL_OF = {"dpo": "DPO", "sft": "SFT", "infonce": "InfoNCE"}
#: Training kinds whose steps run TRL's DPO forward over [chosen; rejected] batches (so `dpo_forward` matters).
_PAIRWISE = ("dpo", "infonce")


def training_extras(kind: str, preset: Preset) -> dict[str, Any]:
    """Key values of a training run beyond the preset's fields: the schedule, for the DPO trainers how a step runs
    its batch, and, under `accelerate launch` with several processes, their number (each takes `batch_size` rows a
    step, so N processes train N times the batch for 1/N of the steps: another adapter; one process adds nothing, so
    a notebook's adapter and a one-process launch's are the same)."""
    processes = _processes().num_processes
    return {"schedule": LR_SCHEDULE, **({"forward": dpo_forward(preset)} if kind in _PAIRWISE else {}),
            **({"processes": processes} if processes > 1 else {})}


def _processes() -> Any:
    """accelerate's view of the processes of this run (one, outside `accelerate launch`): only the main one writes an
    adapter's folder, and the others wait for it (`_claim`, `_finish`)."""
    from accelerate import PartialState

    return PartialState()


def training_label(training: Training) -> str:
    """How log lines name a training: "DPO", "SFT", "InfoNCE", with its trainer arguments if any ("DPO (loss_type=ipo)")."""
    args = ", ".join([f"{k}={v}" for k, v in training.args] + (["full fine-tuning"] if training.weights == "full" else []))
    return _LABEL_OF[training.kind] + (f" ({args})" if args else "")


def adapter_key(training: Training, preset: Preset, seed: int, pairs: Sequence[dict[str, Any]] | None = None) -> cache.Key:
    """The one cache key of a trained adapter: what trained it (the training kind and its trainer arguments), the
    preset fields that kind reads, the schedule and forward (`training_extras`), and the seed's pairs key.

    Never the method's name: methods trained alike (MIPO, and MIPO+CAD which only decodes differently) share one
    adapter. The pipeline builds it before any pairs are loaded; a run given its pairs directly (`train_dpo` without a
    key, as tests and benchmarks call it) passes them as `pairs`, which adds a digest of their content: such pairs need
    not be the seed's stored ones that the pairs key describes."""
    content = {"pairs": cache.content_digest(list(pairs))[:16]} if pairs is not None else {}
    return cache.stage_key(_STAGE_OF[training.kind], preset, f"{training_label(training)} adapter (seed {seed})",
                           upstream=pairs_key(preset, seed), training=training.kind, trainer_args=training.arguments,
                           **content, **_weights_key(training), **training_extras(training.kind, preset))


def _weights_key(training: Training) -> dict[str, str]:
    """`{"weights": "full"}` for a full fine-tuning, nothing for a LoRA adapter: the key of every LoRA adapter trained
    before full fine-tuning existed stays what it was, so their caches are still found."""
    return {} if training.weights == "lora" else {"weights": training.weights}


def adapter_name(training: Training, key: cache.Key) -> str:
    """An adapter folder's name, `<training kind>-<digest of its key>` (e.g. `dpo-3f2a9c0d1b7e`).

    Named by what trained it, as its key is: methods trained alike then find one folder (a method's slug would give
    MIPO and MIPO+CAD two folders for one adapter, and train it twice). The digest tells the trainer arguments apart."""
    return f"{training.kind}-{key.digest}"


def finished_run(adapter_dir: Path, key: cache.Key) -> TrainResult | None:
    """A finished training run of `key` read back from its folder, or None (none, unfinished or other settings)."""
    adapter_dir = Path(adapter_dir)
    marker = adapter_dir / DONE_MARKER
    if not cache.reuse(marker, key):
        return None
    info = json.loads(marker.read_text())
    return TrainResult(
        adapter_dir=adapter_dir,
        log=pd.read_csv(adapter_dir / "train_log.csv"),
        seconds=info["seconds"],
        peak_memory_mb=info.get("peak_memory_mb"),
        lora_changed=info.get("lora_changed"),
        sanity=info.get("sanity"),
        reused=True,
    )


def _finish(trainer: Any, adapter_dir: Path, seconds: float, before: dict[str, torch.Tensor], sanity: dict[str, float] | None) -> TrainResult:
    after = _lora_snapshot(trainer.model)
    changed = {n: bool(not torch.equal(before[n], after[n])) for n in before}
    _save_adapter(trainer, adapter_dir)  # transformers and TRL save on the main process only
    log = _log_frame(trainer.state.log_history)
    peak = _peak_memory_mb(next(trainer.model.parameters()).device)
    info = {"seconds": round(seconds, 2), "peak_memory_mb": peak, "lora_changed": changed, "sanity": sanity}
    if trainer.is_world_process_zero():  # one writer; the done marker last, so it never announces a partial folder
        files.write_text(adapter_dir / "train_log.csv", log.to_csv(index=False))
        files.write_text(adapter_dir / DONE_MARKER, json.dumps(info, indent=1))
        for ckpt in adapter_dir.glob("checkpoint-*"):
            shutil.rmtree(ckpt)
    trainer.accelerator.wait_for_everyone()  # no process returns before the adapter is complete
    return TrainResult(adapter_dir, log, seconds, peak, changed, sanity, reused=False)


def _start(training: Training, preset: Preset, seed: int, pairs: Sequence[dict[str, Any]], adapter_dir: Path,
           key: cache.Key | None, redo: bool) -> TrainResult | None:
    """What every trainer does first: its key (default `adapter_key` of these pairs), then the finished run of that key
    if there is one (and not `redo`), else the folder claimed for this run and the peak-memory counter reset."""
    key = key or adapter_key(training, preset, seed, pairs)
    if not redo and (done := finished_run(adapter_dir, key)):
        return done
    _claim(adapter_dir, key, redo)
    _reset_peak_memory()
    return None


def _claim(adapter_dir: Path, key: cache.Key, redo: bool) -> None:
    """Make `adapter_dir` this run's before training: a run of other settings (or any run, with `redo`) is cleared so
    training never resumes from another run's checkpoint; an interrupted run of the same key is kept and resumed.
    The key is stored inside the folder, next to the done marker that `finished_run` waits for."""
    marker, processes = adapter_dir / DONE_MARKER, _processes()
    if processes.is_main_process:
        if cache.prepare(marker, key) or redo:
            shutil.rmtree(adapter_dir, ignore_errors=True)
        cache.store(marker, key)
    processes.wait_for_everyone()  # no process trains (or resumes) before the folder is this run's


def _save_adapter(trainer: Any, adapter_dir: Path) -> None:
    """Save what TRL users expect beside an adapter: `trainer.save_model` (the LoRA weights, the tokenizer with its
    chat template, the training arguments) and TRL's model card (README.md, base model and training method).

    The tokenizer makes the folder loadable on its own (`AutoTokenizer.from_pretrained(adapter_dir)` next to
    `PeftModel.from_pretrained`); the card, which TRL otherwise writes only with epoch checkpoints, is rewritten for
    the final adapter. Both land in `trainer.args.output_dir`, which `common_args` sets to `adapter_dir`.
    """
    trainer.save_model(str(adapter_dir))
    trainer.create_model_card(model_name=Path(adapter_dir).name, tags=["mipo"])


def _reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _prepare(trainer: Any, progress: bool) -> None:
    _quiet(trainer, progress)
    _keep_adapters_fp32(trainer.model)
    prepare_4bit_for_training(trainer.model)  # a CPU eval pass may have repacked 4-bit weights: not trainable


SNAPSHOT_PREFIX = "epoch-"


def snapshot_dir(adapter_dir: Path, epoch: int) -> Path:
    """Where `train_dpo`/`train_sft` with `snapshot_epochs` keep the adapter as it was after `epoch` epochs."""
    return Path(adapter_dir) / f"{SNAPSHOT_PREFIX}{epoch}"


def _snapshot_callback(adapter_dir: Path, epochs: Sequence[int]) -> Any:
    """A transformers callback saving the LoRA adapter after each epoch in `epochs` (written atomically, so an
    interrupted save is redone by the resumed run; a finished snapshot is kept)."""
    from transformers import TrainerCallback

    wanted = set(epochs)

    class SnapshotCallback(TrainerCallback):  # type: ignore[misc]
        def on_epoch_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            epoch = round(state.epoch or 0)
            target = snapshot_dir(adapter_dir, epoch)
            if epoch in wanted and model is not None and state.is_world_process_zero and not target.exists():
                with files.atomic(target, directory=True) as tmp:
                    model.save_pretrained(str(tmp))

    return SnapshotCallback()


def _run(trainer: Any, adapter_dir: Path, sanity: dict[str, float] | None, snapshot_epochs: Sequence[int] = ()) -> TrainResult:
    """Train (resuming an interrupted run), then save the adapter, its log and what changed; with `snapshot_epochs`,
    also the adapter after each of those epochs (`snapshot_dir`)."""
    if snapshot_epochs:
        trainer.add_callback(_snapshot_callback(adapter_dir, snapshot_epochs))
    before = _lora_snapshot(trainer.model)
    seconds = _train(trainer, adapter_dir)
    return _finish(trainer, adapter_dir, seconds, before, sanity)


ELAPSED_FILE = "elapsed_seconds.json"
"""Written into each epoch checkpoint: the training seconds up to it, summed over every segment of a resumed run."""


def _elapsed_callback(offset: float, start: float) -> Any:
    """A transformers callback writing the training seconds so far (`offset` from earlier segments plus this one's,
    timed from `start`) into each checkpoint as it is saved, so a resumed run reports the time of the whole training
    rather than of its last segment."""
    from transformers import TrainerCallback

    class ElapsedCallback(TrainerCallback):  # type: ignore[misc]
        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and checkpoint.is_dir():
                seconds = offset + time.perf_counter() - start
                files.write_text(checkpoint / ELAPSED_FILE, json.dumps({"seconds": round(seconds, 2)}))

    return ElapsedCallback()


def _train(trainer: Any, adapter_dir: Path) -> float:
    """Train, resuming from the last epoch checkpoint of an interrupted run if there is one; returns the seconds of
    the whole training (earlier segments' time is read from the checkpoint, `ELAPSED_FILE`)."""
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(str(adapter_dir)) if adapter_dir.exists() else None
    elapsed = Path(last) / ELAPSED_FILE if last else None
    offset = float(json.loads(elapsed.read_text())["seconds"]) if elapsed and elapsed.is_file() else 0.0
    start = time.perf_counter()
    trainer.add_callback(_elapsed_callback(offset, start))
    trainer.train(resume_from_checkpoint=last)
    return offset + time.perf_counter() - start


def train_dpo(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[dict[str, Any]],
    preset: Preset,
    seed: int,
    adapter_dir: Path,
    *,
    trainer_args: Mapping[str, Any] | None = None,
    reuse_reference: bool = True,
    key: cache.Key | None = None,
    redo: bool = False,
    progress: bool = True,
    snapshot_epochs: Sequence[int] = (),
    eval_pairs: Sequence[dict[str, Any]] | None = None,
    weights: str = "lora",
) -> TrainResult:
    """MIPO: DPO on the pairs with a fresh LoRA adapter on `model` (modified in place), or with `weights="full"` on
    every parameter of `model` (the paper's regime: the folder then holds the whole fine-tuned model), with a method's
    `trainer_args` over `dpo_config_kwargs`. Reuses a finished run of the same cache `key` (default: `adapter_key` of
    these pairs) and resumes an interrupted one. `snapshot_epochs` keeps the adapter after those epochs too
    (`snapshot_dir`; give them in the key if the caller relies on them).

    `eval_pairs` (pairs with reference log-probs, e.g. `pipeline.validation_pairs`) are evaluated
    `evals_per_epoch(preset.epochs)` times an epoch; their loss, reward margin and accuracy join the log (`eval_*`
    columns). They are a diagnostic, not part of the key: the adapter is the same with or without them
    (tests/test_validation_curves.py compares every LoRA tensor)."""
    training = Training.of("dpo", trainer_args, weights)
    adapter_dir = Path(adapter_dir)
    if done := _start(training, preset, seed, pairs, adapter_dir, key, redo):
        return done
    DPOConfig, PairsDPOTrainer, _, _ = _trainer_classes()
    args = DPOConfig(**dpo_config_kwargs(preset, seed, adapter_dir, model, reuse_reference, progress, n_rows=len(pairs),
                                         trainer_args=training.arguments, evaluated=bool(eval_pairs)))
    trainer = PairsDPOTrainer(
        model=model,
        args=args,
        train_dataset=dpo_dataset(pairs, with_reference=reuse_reference),
        eval_dataset=dpo_dataset(eval_pairs) if eval_pairs else None,
        processing_class=tokenizer,
        # no reference model either way: the pairs carry the reference log-probs (`precompute_ref_log_probs`)
        peft_config=lora_config(preset) if weights == "lora" else None,
    )
    _prepare(trainer, progress)
    if reuse_reference:
        check_reference_tokens(trainer, pairs, preset.max_length)
    if eval_pairs:
        check_reference_tokens(trainer, eval_pairs, preset.max_length, trainer.eval_dataset)
    return _run(trainer, adapter_dir, sanity=initial_sanity(trainer, pairs, reuse_reference), snapshot_epochs=snapshot_epochs)


def _one_batch_trainer(
    model: Any, tokenizer: Any, pairs: Sequence[dict[str, Any]], preset: Preset, output_dir: Path, negatives: int | None = None,
) -> Any:
    """A DPO trainer over `pairs` as a single batch (training and evaluation alike, so its loss is the mean over the
    pairs), reference log-probs from the pairs, tokens checked against them: for the checks below, which train nothing.
    With `negatives` = K, the InfoNCE trainer over groups of K pairs instead (its loss the mean over the prompts)."""
    DPOConfig, PairsDPOTrainer, _, _ = _trainer_classes()
    kwargs = dpo_config_kwargs(preset, 0, output_dir, model, reuse_reference=True, progress=False)
    if negatives is None:
        trainer_class = PairsDPOTrainer
    else:
        _check_groups(pairs, negatives)
        trainer_class, kwargs = _infonce_trainer_class(negatives), {**kwargs, **INFONCE_CONFIG}
    args = DPOConfig(**{**kwargs, "per_device_train_batch_size": len(pairs), "per_device_eval_batch_size": len(pairs)})
    trainer = _quiet(trainer_class(model=model, args=args, train_dataset=dpo_dataset(pairs), processing_class=tokenizer), False)
    check_reference_tokens(trainer, pairs, preset.max_length)
    return trainer


def loss_and_gradients(trainer: Any) -> tuple[float, dict[str, torch.Tensor]]:
    """The loss of a one-batch trainer (`_one_batch_trainer`) on its batch and the gradient of every trainable
    parameter, by name; in eval mode (no dropout), nothing trained, existing gradients cleared first."""
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))  # on the model's device
    trainer.model.eval()
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.model.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


def trl_loss_gradients(model: Any, tokenizer: Any, pairs: Sequence[dict[str, Any]], preset: Preset, output_dir: Path) -> tuple[float, dict[str, torch.Tensor]]:
    """TRL's DPO loss on `pairs` as one batch (reference log-probs from the pairs) and its gradient with respect to
    each trainable parameter of `model` (a PEFT model loaded with `load_adapted(..., trainable=True)`), by name.

    Why: a training step is the optimizer applied to this gradient; notebook 03 checks that a hand-written loss
    gives the same gradient, which pins down what TRL's step optimizes (a loss can match at one point while its
    gradient differs, e.g. with a detached term). Run in eval mode (no dropout) so both sides see the same model.
    Nothing is trained or saved; existing gradients are cleared first.
    """
    return loss_and_gradients(_one_batch_trainer(model, tokenizer, pairs, preset, output_dir))


def initial_sanity(trainer: Any, pairs: Sequence[dict[str, Any]], reuse_reference: bool, n: int = 16, group: int = 1) -> dict[str, float]:
    """Loss and reward margin before any update, on the first `n` pairs (whole groups of `group` pairs): with
    policy == reference they must be log 2 = 0.6931 and 0 for DPO, log(K + 1) and 0 for InfoNCE over K negatives."""
    subset = dpo_dataset(pairs[: max(group, n - n % group)], with_reference=reuse_reference)
    metrics = trainer.evaluate(eval_dataset=subset, metric_key_prefix="init")
    margin = next((v for k, v in metrics.items() if k.endswith("rewards/margins")), float("nan"))
    return {"loss": float(metrics["init_loss"]), "margin": float(margin)}


def trl_loss_on_pairs(model: Any, tokenizer: Any, pairs: Sequence[dict[str, Any]], preset: Preset, output_dir: Path) -> dict[str, float]:
    """TRL's own sigmoid DPO loss and mean reward margin of `model` on `pairs`, with the reference log-probs stored in
    the pairs (as training uses them). `model` is the policy as it stands: a PEFT model with its trained adapter, or a
    plain one (then policy == reference and the loss is log 2).

    Why: at step 0 any DPO implementation returns log 2 and margin 0, so agreeing there proves little; notebook 03
    checks its five-line loss against this number on a *trained* adapter, where a wrong sign, a missing beta or a
    mean-instead-of-sum over tokens would show. Nothing is trained or saved (`output_dir` only satisfies the config).
    """
    trainer = _one_batch_trainer(model, tokenizer, pairs, preset, output_dir)
    metrics = trainer.evaluate(eval_dataset=dpo_dataset(pairs), metric_key_prefix="check")
    margin = next((v for k, v in metrics.items() if k.endswith("rewards/margins")), float("nan"))
    return {"loss": float(metrics["check_loss"]), "margin": float(margin)}


def train_sft(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[dict[str, Any]],
    preset: Preset,
    seed: int,
    adapter_dir: Path,
    *,
    trainer_args: Mapping[str, Any] | None = None,
    key: cache.Key | None = None,
    redo: bool = False,
    progress: bool = True,
    snapshot_epochs: Sequence[int] = (),
) -> TrainResult:
    """The SFT baseline: the same LoRA trained on the positives only, same schedule, `preset.sft_epochs` epochs
    (cached like DPO; `trainer_args` and `snapshot_epochs` as in `train_dpo`)."""
    training = Training.of("sft", trainer_args)
    adapter_dir = Path(adapter_dir)
    if done := _start(training, preset, seed, pairs, adapter_dir, key, redo):
        return done
    _, _, SFTConfig, SFTTrainer = _trainer_classes()
    train = sft_dataset(pairs)
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(**sft_config_kwargs(preset, seed, adapter_dir, model, progress, n_rows=len(train),
                                           trainer_args=training.arguments)),
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=lora_config(preset),
    )
    _prepare(trainer, progress)
    return _run(trainer, adapter_dir, sanity=None, snapshot_epochs=snapshot_epochs)


# ------------------------------------------------------------------------------------ the multi-negative objective
def infonce_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float, k: int) -> torch.Tensor:
    """Mean over prompts of -log softmax_0(beta [d+, d-_1, ..., d-_K]), with d = log pi(y|x) - log pi_ref(y|x) summed
    over the reply's tokens, as DPO's: the K+1-way contrast of a prompt's positive against its K negatives (the
    InfoNCE bound of notebook 01; SAMI's objective). At K = 1 it is DPO's -log sigmoid(beta (d+ - d-)); with policy ==
    reference every d is 0 and it is log(K + 1).

    Both tensors hold one value per pair, a prompt's K pairs consecutive (`pairs.build_pairs`' order): the K pairs
    share y+, so their K chosen log-ratios are one value, averaged here (equal up to rounding)."""
    positive = chosen_logratios.view(-1, k).mean(dim=1, keepdim=True)
    logits = beta * torch.cat([positive, rejected_logratios.view(-1, k)], dim=1)
    return -torch.log_softmax(logits, dim=1)[:, 0].mean()


#: DPOConfig values the InfoNCE trainer needs on top of `dpo_config_kwargs`: evaluation reports the loss only (its loss
#: builds no logits for `compute_metrics`).
INFONCE_CONFIG: dict[str, Any] = {"prediction_loss_only": True}
#: DPOConfig options of TRL's DPO loss, which InfoNCE replaces: as its trainer arguments they would be silently ignored
#: (or, for the reference, not read from the pairs), so they are refused.
_DPO_LOSS_OPTIONS = ("loss_type", "loss_weights", "ld_alpha", "f_divergence_type", "use_weighting", "label_smoothing",
                     "precompute_ref_log_probs")


def _check_groups(pairs: Sequence[dict[str, Any]], k: int) -> None:
    """Pairs must come as K consecutive pairs per prompt (one prompt and one positive each, `pairs.build_pairs`'
    order), and every prompt must have exactly K: a softmax over part of a prompt's negatives, or over two prompts'
    negatives, is not the objective."""
    counts = Counter(p["example_id"] for p in pairs)
    if any(n != k for n in counts.values()):
        raise MipoError(f"InfoNCE with K={k} needs {k} pairs per prompt, got {sorted(set(counts.values()))}; build the "
                        f"pairs with k_negatives={k}")
    for start in range(0, len(pairs), k):
        group = pairs[start : start + k]
        if len({(p["example_id"], json.dumps(p["prompt"]), p["chosen"]) for p in group}) != 1:
            raise MipoError(f"pairs {start}-{start + k - 1} are not the {k} pairs of one prompt; keep each prompt's pairs "
                            "together, in pairs.build_pairs' order")


def check_batch_groups(chosen_ids: torch.Tensor, k: int) -> None:
    """Refuse a batch whose rows are not whole groups of a prompt's K pairs: its chosen rows (prompt + positive token
    ids) must come in runs of K identical rows. Checked on every batch, so a sampler or batch size that splits a
    prompt's negatives fails instead of training another objective."""
    rows = chosen_ids.shape[0]
    if rows % k:
        raise MipoError(f"a batch of {rows} pairs splits a prompt's K={k} negatives; use a batch_size that is a multiple of {k}")
    grouped = chosen_ids.view(rows // k, k, -1)
    if not torch.equal(grouped, grouped[:, :1].expand_as(grouped)):
        raise MipoError(f"a batch mixes the pairs of different prompts within a group of K={k}; batches must hold whole "
                        "prompts (InfoNCE's GroupSampler)")


class GroupSampler(torch.utils.data.Sampler[int]):
    """Row indices in whole groups of `k` consecutive rows (a prompt's K pairs), the groups in a random order drawn
    afresh each epoch, each group's rows together and in order. With a batch size that is a multiple of K every batch
    then holds whole prompts.

    The order is drawn like transformers' default `RandomSampler` (a seed from torch's global generator, which the
    trainer seeds and restores when it resumes), so at K = 1 it is the very order DPO trains in."""

    def __init__(self, n_rows: int, k: int) -> None:
        if n_rows % k:
            raise MipoError(f"{n_rows} pairs are not whole groups of K={k}; build the pairs with k_negatives={k}")
        self.n_rows, self.k = n_rows, k

    def __len__(self) -> int:
        return self.n_rows

    def __iter__(self) -> Iterator[int]:
        seed = int(torch.empty((), dtype=torch.int64).random_().item())
        order = torch.randperm(self.n_rows // self.k, generator=torch.Generator().manual_seed(seed))
        for group in order.tolist():
            yield from range(group * self.k, (group + 1) * self.k)


def _policy_logps(model: Any, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the batch's chosen and rejected replies under `model`, as TRL's DPO loss computes them: its
    collator's [chosen; rejected] rows, labels on the completion only, TRL's fused LM head."""
    model_kwargs = {k: v for k, v in inputs.items() if k not in ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")}
    completion_mask = inputs["completion_mask"]
    labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
    outputs = model(**model_kwargs, use_cache=False, labels=labels, fused_lm_head=True)
    logps = outputs.log_probs[:, -(completion_mask.size(1) - 1) :].sum(dim=1)
    chosen, rejected = logps.chunk(2, dim=0)
    return chosen, rejected


def _infonce_trainer_class(k: int) -> type:
    """TRL's DPO trainer (`PairsDPOTrainer`: reference log-probs from the pairs, CPU prompt sharing) with the InfoNCE
    loss over groups of `k` pairs and a sampler that keeps each prompt's pairs together."""
    _, PairsDPOTrainer, _, _ = _trainer_classes()

    class InfoNCETrainer(PairsDPOTrainer):  # type: ignore[misc, valid-type]
        negatives = k

        def _get_train_sampler(self, train_dataset: Any = None) -> GroupSampler:
            return GroupSampler(len(train_dataset if train_dataset is not None else self.train_dataset), self.negatives)

        def _pairs_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool) -> torch.Tensor:
            if return_outputs:
                raise MipoError("the InfoNCE loss builds no logits; evaluate it with prediction_loss_only (INFONCE_CONFIG)")
            chosen_ids, _ = inputs["input_ids"].chunk(2, dim=0)
            check_batch_groups(chosen_ids, self.negatives)
            chosen_logps, rejected_logps = _policy_logps(model, inputs)
            chosen = chosen_logps - inputs["ref_chosen_logps"]
            rejected = rejected_logps - inputs["ref_rejected_logps"]
            self._log_rewards(chosen.detach(), rejected.detach(), chosen_logps.detach(), rejected_logps.detach())
            return infonce_loss(chosen, rejected, self.beta, self.negatives)

        def _log_rewards(self, chosen: torch.Tensor, rejected: torch.Tensor, chosen_logps: torch.Tensor,
                         rejected_logps: torch.Tensor) -> None:
            """The per-pair metrics TRL's DPO logs, under its names (reward = beta x log-ratio), so training logs,
            `reward_accuracy` and the sanity check read InfoNCE runs as they read DPO ones."""
            mode = "train" if self.model.training else "eval"
            chosen_rewards, rejected_rewards = self.beta * chosen, self.beta * rejected
            for name, value in (("rewards/chosen", chosen_rewards), ("rewards/rejected", rejected_rewards),
                                ("rewards/accuracies", (chosen_rewards > rejected_rewards).float()),
                                ("rewards/margins", chosen_rewards - rejected_rewards),
                                ("logps/chosen", chosen_logps), ("logps/rejected", rejected_logps)):
                self._metrics[mode][name].append(self.accelerator.gather(value).mean().item())

    return InfoNCETrainer


def train_infonce(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[dict[str, Any]],
    preset: Preset,
    seed: int,
    adapter_dir: Path,
    *,
    trainer_args: Mapping[str, Any] | None = None,
    key: cache.Key | None = None,
    redo: bool = False,
    progress: bool = True,
    snapshot_epochs: Sequence[int] = (),
) -> TrainResult:
    """The multi-negative objective (`infonce_loss`) on the pairs, K = `preset.k_negatives` per prompt, with DPO's
    settings (beta, epochs, learning rate, LoRA, schedule, reference log-probs from the pairs). Every batch holds whole
    prompts: `preset.batch_size` must be a multiple of K, and `GroupSampler` shuffles prompts, not pairs. Cached,
    resumed and snapshotted like `train_dpo`; the sanity check before training is log(K + 1) and margin 0."""
    training, k = Training.of("infonce", trainer_args), preset.k_negatives
    if clash := sorted(set(training.arguments) & set(_DPO_LOSS_OPTIONS)):
        raise MipoError(f"InfoNCE has its own loss and reads the reference log-probs from the pairs; drop {clash} from "
                        "its trainer_args")
    _check_groups(pairs, k)
    if preset.batch_size % k:
        raise MipoError(f"InfoNCE contrasts a prompt's K={k} negatives in one batch: batch_size {preset.batch_size} is not "
                        f"a multiple of k_negatives; set batch_size={k * max(1, preset.batch_size // k)}")
    adapter_dir = Path(adapter_dir)
    if done := _start(training, preset, seed, pairs, adapter_dir, key, redo):
        return done
    DPOConfig, _, _, _ = _trainer_classes()
    config = dpo_config_kwargs(preset, seed, adapter_dir, model, True, progress, n_rows=len(pairs), trainer_args=training.arguments)
    trainer = _infonce_trainer_class(k)(
        model=model,
        args=DPOConfig(**{**config, **INFONCE_CONFIG, "per_device_eval_batch_size": preset.batch_size}),
        train_dataset=dpo_dataset(pairs),
        processing_class=tokenizer,
        peft_config=lora_config(preset),
    )
    _prepare(trainer, progress)
    check_reference_tokens(trainer, pairs, preset.max_length)
    return _run(trainer, adapter_dir, sanity=initial_sanity(trainer, pairs, True, group=k), snapshot_epochs=snapshot_epochs)


def trainer_of(kind: str) -> Callable[..., TrainResult]:
    """The function that trains a training kind (looked up when called, so a test may wrap `train_dpo` and the like)."""
    return {"dpo": train_dpo, "sft": train_sft, "infonce": train_infonce}[kind]


def train(
    training: Training, model: Any, tokenizer: Any, pairs: Sequence[dict[str, Any]], preset: Preset, seed: int,
    adapter_dir: Path, **kwargs: Any,
) -> TrainResult:
    """Train a method's adapter: its training kind's trainer (`trainer_of`) with its trainer arguments. `kwargs` go to
    that trainer (`key`, `redo`, `progress`, `snapshot_epochs`); a full fine-tuning (`Training.weights`) is DPO's only."""
    if training.weights != "lora":
        if training.kind != "dpo":
            raise MipoError(f"full fine-tuning is implemented for DPO only; train {training.kind!r} with weights='lora'")
        kwargs["weights"] = training.weights
    return trainer_of(training.kind)(model, tokenizer, pairs, preset, seed, adapter_dir, trainer_args=training.arguments, **kwargs)


def load_adapted(model: Any, adapter_dir: Path, merge: bool = True, trainable: bool = False) -> Any:
    """Base model + a trained adapter, merged for fast generation (kept separate on a 4-bit base). `trainable` keeps
    the adapter's weights requiring gradients (and unmerged), for a gradient check such as `trl_loss_gradients`.
    A full fine-tuning's folder (no adapter, the whole model: `train_dpo(weights="full")`) replaces `model`'s weights."""
    from peft import PeftModel

    if not (Path(adapter_dir) / "adapter_config.json").exists():
        return _load_full(model, Path(adapter_dir))

    peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
    merge = merge and not trainable
    quantized = getattr(model.config, "quantization_config", None) is not None
    merged = peft_model.merge_and_unload() if merge and not quantized else peft_model
    merged.eval()
    return merged


def _load_full(model: Any, folder: Path) -> Any:
    """`model` with the weights of a full fine-tuning saved in `folder` (`save_pretrained`'s safetensors), loaded in
    place in `model`'s own dtype. Only the output layer tied to the embeddings may be absent from the file (it is
    saved once); any other missing or unknown weight means the folder is not this model's."""
    from safetensors.torch import load_file

    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise MipoError(f"{folder} holds neither a LoRA adapter nor a model's weights; train it again (redo=True)")
    state = {name: tensor for shard in shards for name, tensor in load_file(str(shard)).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise MipoError(f"{folder}'s weights do not fit this model (missing {sorted(set(missing) - tied)[:3]}, "
                        f"unknown {sorted(unexpected)[:3]}); was it trained on another base model?")
    model.eval()
    return model


def reward_accuracy(log: pd.DataFrame, last_fraction: float = 0.25) -> float:
    """Mean DPO reward accuracy over the last quarter of logged steps."""
    col = "rewards/accuracies"
    if col not in log or log[col].dropna().empty:
        raise MipoError("this training log has no reward accuracies (is it an SFT log?)")
    values = log[col].dropna()
    return float(values.iloc[-max(1, int(len(values) * last_fraction)) :].mean())
