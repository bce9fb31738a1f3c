"""DPO (MIPO) and SFT through TRL with LoRA, on the smoke preset's tiny model: the untrained sanity values, every
LoRA weight moving, reference log-probs read from the pairs (never recomputed), 4-bit QLoRA on the CPU, reuse."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import math

import numpy as np
import pytest
import torch

from mipo_lib import dpo, methods, models
from mipo_lib.config import get_preset
from mipo_lib.errors import MipoError
from mipo_lib.generate import generate_batches
from mipo_lib.models import load_for_preset
from mipo_lib.pairs import build_pairs
from mipo_lib.tasks import get_task

N_LORA_TENSORS = 2 * 4 * 2  # layers x target modules x (A, B)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def preset():
    # 16 pairs, 4 per step, 2 epochs: 8 optimizer steps
    return get_preset("smoke", n_train_prompts=16, batch_size=4, epochs=2)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("dpo")


@pytest.fixture(scope="module")
def pairs(preset, workdir):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MIPO_RUNS_DIR", str(workdir / "runs"))
        model, tok = load_for_preset(preset)
        return build_pairs(model, tok, get_task("personalization"), preset, seed=0, progress=False)


@pytest.fixture(scope="module")
def trained(preset, pairs, workdir):
    model, tok = load_for_preset(preset)
    result = dpo.train_dpo(model, tok, pairs, preset, 0, workdir / "dpo-adapter", progress=False)
    return result, model


# ------------------------------------------------------------------------------------------------------------- DPO
def test_initial_sanity_is_log2_and_zero_margin(trained):
    result, _ = trained
    assert result.sanity["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert abs(result.sanity["margin"]) < 1e-3
    assert not result.reused


def test_training_ran_all_steps(trained):
    result, _ = trained
    log = result.log
    assert len(log) >= 8
    assert log["step"].tolist() == list(range(1, len(log) + 1))
    assert np.isfinite(log["loss"]).all()
    for col in ("rewards/margins", "rewards/accuracies", "learning_rate"):
        assert col in log
    assert 0.0 <= dpo.reward_accuracy(log) <= 1.0


def test_every_lora_parameter_changed(trained):
    result, model = trained
    changed = result.lora_changed
    assert len(changed) == N_LORA_TENSORS
    assert all("lora_A" in n or "lora_B" in n for n in changed)
    assert all(changed.values()), [n for n, c in changed.items() if not c]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)  # fp32 CPU run keeps fp32 adapters


def test_adapter_folder(trained, preset):
    result, _ = trained
    folder = result.adapter_dir
    for name in ("adapter_config.json", "adapter_model.safetensors", "train_log.csv", dpo.DONE_MARKER):
        assert (folder / name).is_file(), name
    assert not list(folder.glob("checkpoint-*"))  # epoch checkpoints are removed once training is done
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["r"] == preset.lora_r and set(cfg["target_modules"]) == set(preset.lora_target_modules)


def test_finished_run_is_reused(trained, preset, pairs, monkeypatch):
    result, _ = trained

    def forbidden():
        raise AssertionError("a finished run must not build a trainer")

    monkeypatch.setattr(dpo, "_trainer_classes", forbidden)
    model, tok = load_for_preset(preset)
    again = dpo.train_dpo(model, tok, pairs, preset, 0, result.adapter_dir, progress=False)
    assert again.reused
    assert again.sanity == pytest.approx(result.sanity)
    assert again.lora_changed == result.lora_changed
    assert len(again.log) == len(result.log)
    assert np.allclose(again.log["loss"], result.log["loss"])


def test_a_resumed_training_reports_the_time_of_every_segment(preset, pairs, workdir, monkeypatch):
    """Interrupt a training right after its first epoch checkpoint, then resume it: the reported seconds include the
    interrupted segment's (stored in the checkpoint), not only the resumed one's."""
    folder = workdir / "interrupted"
    make_callback = dpo._elapsed_callback

    def interrupting(offset, start):
        callback = make_callback(offset, start)
        save = callback.on_save

        def save_then_stop(*args, **kwargs):
            save(*args, **kwargs)
            raise KeyboardInterrupt

        callback.on_save = save_then_stop
        return callback

    monkeypatch.setattr(dpo, "_elapsed_callback", interrupting)
    with pytest.raises(KeyboardInterrupt):
        dpo.train_dpo(*load_for_preset(preset), pairs, preset, 0, folder, progress=False)
    (checkpoint,) = folder.glob("checkpoint-*")
    first = json.loads((checkpoint / dpo.ELAPSED_FILE).read_text())["seconds"]
    assert first > 0
    (checkpoint / dpo.ELAPSED_FILE).write_text(json.dumps({"seconds": 1000.0}))  # as if the first segment took long
    monkeypatch.setattr(dpo, "_elapsed_callback", make_callback)
    resumed = dpo.train_dpo(*load_for_preset(preset), pairs, preset, 0, folder, progress=False)
    assert resumed.log["step"].max() == 8 and not resumed.reused
    assert 1000.0 < resumed.seconds < 1000.0 + 600
    assert json.loads((folder / dpo.DONE_MARKER).read_text())["seconds"] == pytest.approx(resumed.seconds, abs=0.01)


def test_a_non_finite_loss_stops_the_run_before_its_update_and_any_checkpoint(preset, pairs, workdir, monkeypatch):
    """The loss turns NaN at step 3 (as an fp16 overflow would): the run stops with one line naming the fix, the LoRA
    weights are those after step 2 (step 3's update never happened), and nothing was saved (the first checkpoint
    would come after step 4, the end of epoch 1)."""
    folder, k, seen = workdir / "nan", 3, {}
    make_classes = dpo._trainer_classes

    def poisoned_classes():
        DPOConfig, PairsDPOTrainer, SFTConfig, SFTTrainer = make_classes()

        class Poisoned(PairsDPOTrainer):
            def _pairs_loss(self, model, inputs, return_outputs):
                out = super()._pairs_loss(model, inputs, return_outputs)
                if self.model.training and self.state.global_step == k - 1:
                    seen["before"] = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
                    return out * float("nan")
                return out

        return DPOConfig, Poisoned, SFTConfig, SFTTrainer

    monkeypatch.setattr(dpo, "_trainer_classes", poisoned_classes)
    model, tok = load_for_preset(preset)
    with pytest.raises(MipoError, match=f"step {k}: the training loss is nan") as err:
        dpo.train_dpo(model, tok, pairs, preset, 0, folder, progress=False)
    assert "\n" not in str(err.value) and "nothing of it was applied or saved" in str(err.value)
    after = [p for n, p in model.named_parameters() if "lora_" in n]  # the same modules, in the same order
    assert len(seen["before"]) == len(after) == N_LORA_TENSORS
    assert all(torch.equal(before, now) for before, now in zip(seen["before"].values(), after))
    assert not list(folder.glob("checkpoint-*")) and not (folder / dpo.DONE_MARKER).exists()


def test_the_fix_named_for_a_non_finite_loss_depends_on_the_precision():
    model = torch.nn.Linear(2, 2).half()
    model.config = type("Config", (), {})()
    with pytest.raises(MipoError, match="dtype=float32"):
        dpo.check_finite_loss(torch.tensor(float("inf")), 5, model)
    dpo.check_finite_loss(torch.tensor(0.69), 5, model)  # finite: nothing happens


def test_reference_logps_come_from_the_pairs(preset, pairs, workdir, monkeypatch):
    """Shift the stored ref log-probs of the chosen side by +5: the untrained margin must move by -beta*5, and no
    reference forward pass may run at all (neither at set-up, in the sanity check, nor while training)."""
    import trl

    def no_reference_forward(*args, **kwargs):
        raise AssertionError("TRL computed reference log-probs although the pairs carry them")

    monkeypatch.setattr(trl.DPOTrainer, "compute_ref_log_probs", no_reference_forward)
    shifted = [{**p, "ref_chosen_logps": p["ref_chosen_logps"] + 5.0} for p in pairs]
    one_epoch = preset.with_overrides(epochs=1)
    model, tok = load_for_preset(one_epoch)
    result = dpo.train_dpo(model, tok, shifted, one_epoch, 0, workdir / "dpo-shifted", progress=False)
    assert result.sanity["margin"] == pytest.approx(-preset.beta * 5.0, abs=1e-2)
    expected_loss = -math.log(1 / (1 + math.exp(preset.beta * 5.0)))  # -log sigmoid(-beta * 5)
    assert result.sanity["loss"] == pytest.approx(expected_loss, abs=1e-2)


def test_stored_reference_equals_trls_own(preset, pairs, workdir):
    """What TRL computes itself (adapter disabled, its tokenization and collator) equals the stored log-probs."""
    DPOConfig, PairsDPOTrainer, _, _ = dpo._trainer_classes()
    model, tok = load_for_preset(preset)
    args = DPOConfig(**dpo.dpo_config_kwargs(preset, 0, workdir / "trl-ref", model, reuse_reference=True, progress=False))
    trainer = PairsDPOTrainer(
        model=model, args=args, train_dataset=dpo.dpo_dataset(pairs, with_reference=False),
        processing_class=tok, peft_config=models.lora_config(preset),
    )
    ds = trainer.train_dataset
    assert len(ds) == len(pairs)
    np.testing.assert_allclose(ds["ref_chosen_logps"], [p["ref_chosen_logps"] for p in pairs], atol=1e-3)
    np.testing.assert_allclose(ds["ref_rejected_logps"], [p["ref_rejected_logps"] for p in pairs], atol=1e-3)
    dpo.check_reference_tokens(trainer, pairs, preset.max_length)


def test_token_mismatch_is_caught(preset, pairs, workdir):
    bad = [dict(p) for p in pairs]
    bad[3]["rejected_tokens"] += 1
    model, tok = load_for_preset(preset)
    with pytest.raises(MipoError, match=rf"{bad[3]['pair_id']}.*redo=True"):
        dpo.train_dpo(model, tok, bad, preset, 0, workdir / "dpo-bad", progress=False)


@pytest.mark.parametrize("flag", [False, True])
def test_gradient_checkpointing_follows_the_preset(preset, workdir, flag):
    """TRL's configs default to activation checkpointing on; the preset's setting must win either way."""
    DPOConfig, _, SFTConfig, _ = dpo._trainer_classes()
    p = preset.with_overrides(gradient_checkpointing=flag)
    model, _ = load_for_preset(preset)
    dargs = DPOConfig(**dpo.dpo_config_kwargs(p, 0, workdir / "gc", model, progress=False))
    sargs = SFTConfig(**dpo.sft_config_kwargs(p, 0, workdir / "gc", model, progress=False))
    assert bool(dargs.gradient_checkpointing) is flag
    assert bool(sargs.gradient_checkpointing) is flag


def test_a_methods_trainer_arguments_reach_the_trainer_config(preset, workdir):
    """A method's trainer_args go over the kind's own config (MIPO has none: TRL's sigmoid DPO loss)."""
    DPOConfig, _, SFTConfig, _ = dpo._trainer_classes()
    model, _ = load_for_preset(preset)
    mipo = methods.get_method("MIPO").trainer
    assert mipo.arguments == {} and DPOConfig(**dpo.dpo_config_kwargs(
        preset, 0, workdir / "args", model, progress=False, trainer_args=mipo.arguments)).loss_type == ["sigmoid"]
    hinge = dpo.dpo_config_kwargs(preset, 0, workdir / "args", model, progress=False, trainer_args={"loss_type": "hinge"})
    assert DPOConfig(**hinge).loss_type == ["hinge"]
    sft = dpo.sft_config_kwargs(preset, 0, workdir / "args", model, progress=False, trainer_args={"learning_rate": 1e-3})
    assert SFTConfig(**sft).learning_rate == 1e-3


@pytest.mark.parametrize("kind", methods.TRAININGS)
def test_train_runs_the_kinds_trainer_with_its_arguments(kind, monkeypatch):
    called = []
    name = {"dpo": "train_dpo", "sft": "train_sft", "infonce": "train_infonce"}[kind]
    monkeypatch.setattr(dpo, name, lambda *args, **kwargs: called.append((args, kwargs)))
    dpo.train(methods.Training.of(kind, {"learning_rate": 1e-3}), "model", "tok", [], "preset", 0, "dir", progress=False)
    assert called == [(("model", "tok", [], "preset", 0, "dir"), {"trainer_args": {"learning_rate": 1e-3}, "progress": False})]


def test_qlora_dpo_step_on_cpu(preset, pairs, workdir, bnb_avx512bf16):
    """QLoRA on both bitsandbytes CPU paths: the NF4 base stays frozen, every adapter learns, and the run starts at
    log 2. The pairs were scored by the full-precision model, so the reference here is TRL's own, from the 4-bit
    model with the adapter off (with the stored one the start would be off by the quantization error)."""
    one_epoch = preset.with_overrides(epochs=1)
    model, tok = load_for_preset(one_epoch, load_in_4bit=True)
    assert models.is_4bit(model)
    import bitsandbytes as bnb

    base_before = {
        n: m.weight.data.clone() for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)
    }
    assert base_before
    result = dpo.train_dpo(
        model, tok, pairs, one_epoch, 0, workdir / f"qlora-{bnb_avx512bf16}", reuse_reference=False, progress=False
    )
    assert models.is_4bit(model)
    base_after = {
        n.replace("base_model.model.", "").replace(".base_layer", ""): m.weight.data
        for n, m in model.named_modules()
        if isinstance(m, bnb.nn.Linear4bit)
    }
    assert set(base_after) == set(base_before)
    for n, w in base_before.items():
        assert base_after[n].dtype == torch.uint8
        assert torch.equal(base_after[n], w), f"{n}: the frozen NF4 weight changed"
    assert len(result.lora_changed) == N_LORA_TENSORS and all(result.lora_changed.values())
    assert result.sanity["loss"] == pytest.approx(math.log(2), abs=1e-3)


def test_lora_dpo_step_in_either_cpu_dtype(preset, pairs, workdir, cpu_native_bf16):
    """dtype "auto" on the CPU is bf16 with AVX512-BF16/AMX (the `cpu` preset's path there) and fp32 elsewhere: both
    train every adapter. The pairs were scored in fp32, so only the fp32 run starts exactly at log 2."""
    one_epoch = preset.with_overrides(epochs=1, dtype="auto")
    model, tok = load_for_preset(one_epoch)
    dtype = torch.bfloat16 if cpu_native_bf16 else torch.float32
    assert model.dtype is dtype and dpo.precision_flags(model)["bf16"] is cpu_native_bf16
    result = dpo.train_dpo(model, tok, pairs, one_epoch, 0, workdir / f"lora-{dtype}", progress=False)
    assert np.isfinite(result.log["loss"]).all()
    assert len(result.lora_changed) == N_LORA_TENSORS and all(result.lora_changed.values())
    assert result.sanity["loss"] == pytest.approx(math.log(2), abs=1e-3 if dtype is torch.float32 else 0.05)


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    """The tiny model in both architectures the presets use: Llama (smoke, cpu) and Qwen2 (t4: q/k/v biases)."""
    folders = {}
    for architecture in models.TINY_ARCHITECTURES:
        folder = tmp_path_factory.mktemp(f"tiny-{architecture}")
        models.build_tiny_model(architecture).save_pretrained(folder)
        models.build_tiny_tokenizer().save_pretrained(folder)
        folders[architecture] = folder
    return folders


def _lora_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.fixture(scope="module")
def qlora_without_eval(tiny_checkpoints, preset, pairs, workdir):
    """LoRA weights after one QLoRA epoch of a model that never saw an eval pass nor bitsandbytes' CPU repacking, per
    (architecture, dtype), trained once per module: what a run after an eval pass must reproduce."""
    import bitsandbytes.nn.modules as bnb_modules

    trained: dict[tuple[str, str], dict[str, torch.Tensor]] = {}

    def weights(architecture: str, dtype: str) -> dict[str, torch.Tensor]:
        if (architecture, dtype) not in trained:
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(bnb_modules, "has_avx512bf16", lambda: False)
                model, tok = models.load_model_and_tokenizer(str(tiny_checkpoints[architecture]), load_in_4bit=True, dtype=dtype)
            one_epoch = preset.with_overrides(epochs=1, dtype=dtype)
            dpo.train_dpo(model, tok, pairs, one_epoch, 0, workdir / f"qlora-no-eval-{architecture}-{dtype}", progress=False)
            trained[architecture, dtype] = _lora_weights(model)
        return trained[architecture, dtype]

    return weights


@pytest.mark.parametrize("architecture", models.TINY_ARCHITECTURES)
def test_qlora_trains_after_an_eval_pass(
    architecture, tiny_checkpoints, preset, pairs, workdir, qlora_without_eval, bnb_avx512bf16, cpu_native_bf16
):
    """The workbook generates and scores with the 4-bit model before it trains it. On an AVX512-BF16 CPU that eval
    pass repacks the weights for a kernel without gradients: Qwen2 then fails at its q/k/v biases, and Llama trains
    without gradients through the base weights - every adapter still moves, but to weights more than 100% away from
    the correct ones. On both bitsandbytes paths and in both CPU dtypes, training after an eval pass must give what
    training without one gives (within 6% in bf16, 0.6% in fp32: the repacking stored the NF4 scales in bf16). The
    pairs' reference log-probs come from the Llama model; the tokenizer is the same, so Qwen2 only starts elsewhere."""
    import bitsandbytes as bnb

    one_epoch = preset.with_overrides(epochs=1, dtype="auto")
    model, tok = models.load_model_and_tokenizer(str(tiny_checkpoints[architecture]), load_in_4bit=True, dtype="auto")
    dtype = torch.bfloat16 if cpu_native_bf16 else torch.float32
    assert next(p for p in model.parameters() if p.dtype.is_floating_point).dtype is dtype
    prompts = tok(["say hello", "abc"], return_tensors="pt", padding=True)
    with torch.no_grad():
        model.generate(**prompts, max_new_tokens=4, do_sample=False)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert {bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False)) for m in layers} == {bnb_avx512bf16}
    adapter_dir = workdir / f"qlora-eval-{architecture}-{bnb_avx512bf16}-{cpu_native_bf16}"
    result = dpo.train_dpo(model, tok, pairs, one_epoch, 0, adapter_dir, progress=False)
    assert np.isfinite(result.log["loss"]).all()
    assert len(result.lora_changed) == N_LORA_TENSORS
    assert all(result.lora_changed.values()), [n for n, c in result.lora_changed.items() if not c]
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    expected = qlora_without_eval(architecture, str(dtype).removeprefix("torch."))
    got = _lora_weights(model)
    assert set(got) == set(expected)
    off = {n: ((got[n] - w).norm() / w.norm()).item() for n, w in expected.items()}
    assert max(off.values()) < 0.25, sorted(off.items(), key=lambda kv: -kv[1])[:4]


def test_prepare_4bit_for_training_unpacks_exactly(bnb_avx512bf16):
    """Unpacking restores the NF4 codes bit for bit and switches repacking off, so an eval pass cannot redo it."""
    import bitsandbytes as bnb

    model, tok = models.load_model_and_tokenizer(models.TINY_MODEL, load_in_4bit=True, dtype="float32")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    codes = [m.weight.data.clone() for m in layers]
    batch = tok(["hello"], return_tensors="pt")
    with torch.no_grad():
        before = model(**batch).logits
    assert models.prepare_4bit_for_training(model) == (len(layers) if bnb_avx512bf16 else 0)
    assert models.prepare_4bit_for_training(model) == 0
    with torch.no_grad():
        after = model(**batch).logits
    for m, c in zip(layers, codes):
        assert not m.support_avx512bf16_for_cpu
        assert not getattr(m.weight.quant_state, "packing_format_for_cpu", False)
        assert torch.equal(m.weight.data, c)
    # the fused kernel computes in bf16 and the unpacked scales are re-quantized: close, and identical without packing
    torch.testing.assert_close(after, before, atol=0.02 if bnb_avx512bf16 else 0.0, rtol=0.0)


def test_prepare_4bit_for_training_ignores_full_precision_models(preset):
    model, _ = load_for_preset(preset)
    assert models.prepare_4bit_for_training(model) == 0


# ------------------------------------------------------------------------------------------------- SFT and loading
def test_train_sft(preset, pairs, workdir):
    one_epoch = preset.with_overrides(epochs=1)
    model, tok = load_for_preset(one_epoch)
    result = dpo.train_sft(model, tok, pairs, one_epoch, 0, workdir / "sft", progress=False)
    assert not result.reused and result.sanity is None
    assert len(result.lora_changed) == N_LORA_TENSORS and all(result.lora_changed.values())
    assert len(result.log) >= 4 and np.isfinite(result.log["loss"]).all()
    assert (result.adapter_dir / "adapter_config.json").is_file()
    with pytest.raises(MipoError, match="reward accuracies"):
        dpo.reward_accuracy(result.log)


def test_sft_dataset_has_one_row_per_prompt(pairs):
    doubled = pairs + [{**p, "pair_id": p["pair_id"] + "x"} for p in pairs]
    ds = dpo.sft_dataset(doubled)
    assert len(ds) == len({p["example_id"] for p in pairs})
    assert ds[0]["completion"] == [{"role": "assistant", "content": pairs[0]["chosen"]}]


def test_load_adapted_merges_and_generates(trained, preset):
    result, _ = trained
    base, tok = load_for_preset(preset)
    reference = {n: p.detach().clone() for n, p in base.named_parameters()}
    adapted = dpo.load_adapted(base, result.adapter_dir)
    assert type(adapted).__name__ == "LlamaForCausalLM"  # merged: no PEFT wrapper left, full speed
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(dict(adapted.named_parameters())[q], reference[q])
    ids = [tok.encode("say hello", add_special_tokens=False), tok.encode("abc", add_special_tokens=False)]
    out = [texts for _, texts in generate_batches(adapted, tok, ids, max_new_tokens=4, temperature=1.0, progress=False)]
    assert len(out) == 1 and len(out[0]) == 2 and all(isinstance(t, str) for t in out[0])


# ----------------------------------------------------------------------------------------- compact LM head on CPU
def _fused_logps_and_grad(preset, compact: bool, monkeypatch):
    """Per-token log-probs of TRL's fused head on a padded two-row batch with a masked prompt, and the gradient they
    send back to the hidden states, with or without compaction to the labelled positions."""
    import trl.trainer.utils as trl_utils

    monkeypatch.setattr(trl_utils, "_use_triton", lambda device: compact)
    model, _ = load_for_preset(preset)
    trl_utils.add_fused_lm_head(model)
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    labels = ids.clone()
    labels[:, :7] = -100  # the prompt
    labels[1, 10:] = -100  # padding
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    out = model(inputs_embeds=embeds, labels=labels, fused_lm_head=True)
    out.log_probs.sum().backward()
    return out.log_probs.detach(), embeds.grad


def test_compacted_cpu_lm_head_gives_the_same_logps_and_gradients(preset, monkeypatch):
    plain, plain_grad = _fused_logps_and_grad(preset, False, monkeypatch)
    compact, compact_grad = _fused_logps_and_grad(preset, True, monkeypatch)
    assert (plain != 0).sum() == 5 + 3  # labelled next tokens: positions 7-11 in row 0, 7-9 in row 1
    torch.testing.assert_close(compact, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compact_grad, plain_grad, atol=1e-5, rtol=1e-5)


def test_trainer_classes_compact_the_cpu_lm_head(monkeypatch):
    """After `_trainer_classes`, TRL's compaction predicate says yes on CPU (and keeps its answer elsewhere)."""
    import trl.trainer.utils as trl_utils

    monkeypatch.setattr(trl_utils, "_use_triton", lambda device: False)
    dpo._trainer_classes()
    assert trl_utils._use_triton(torch.device("cpu")) is True
    assert trl_utils._use_triton(torch.device("meta")) is False
    dpo.compact_lm_head_on_cpu()  # idempotent: not wrapped twice
    assert not hasattr(trl_utils._use_triton.trl_predicate, "trl_predicate")


def _chunked_logprobs_and_grads(fold_wrapper, monkeypatch, rows=150):
    """TRL's chunked log-prob function (torch fallback) on random data with several vocabulary chunks, its outputs
    and the gradients of a loss that uses both the log-probs and the entropy."""
    import trl.kernels.chunked_logprob as chunked

    for name in ("_forward_tile", "_backward_tile"):
        fold = getattr(chunked, name)
        monkeypatch.setattr(chunked, name, fold_wrapper(getattr(fold, "trl_fold", fold)))
    monkeypatch.setattr(chunked, "_use_triton", lambda device: False)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, 48, generator=gen).requires_grad_(True)
    weight = torch.randn(1000, 48, generator=gen).requires_grad_(True)
    targets = torch.randint(0, 1000, (rows,), generator=gen)
    logps, entropy, *_ = chunked.ChunkedLogProbFunction.apply(hidden, weight, None, targets, 0.7, 384)
    (logps.sum() + 0.1 * entropy.sum()).backward()
    return logps.detach(), entropy.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("rows", [150, 64, 1])
def test_lm_head_tiles_in_row_blocks_are_bit_identical(monkeypatch, rows):
    """Row blocks change which temporaries exist at once, not one bit of the log-probs, entropies or gradients: 150
    rows make three blocks of 50 (no one-row tail), 64 and 1 fit in one."""
    with monkeypatch.context() as m:
        whole = _chunked_logprobs_and_grads(lambda fold: fold, m, rows)
    with monkeypatch.context() as m:
        blocked = _chunked_logprobs_and_grads(dpo._in_row_blocks, m, rows)
    for a, b in zip(whole, blocked):
        assert torch.equal(a, b)


def test_row_blocks_call_the_fold_on_even_blocks_with_per_row_arguments_sliced():
    calls = []
    blocked = dpo._in_row_blocks(lambda tile, stride, targets, flag, **kw: calls.append((tile.shape[0], stride,
                                                                                         targets.tolist(), flag, kw)))
    tile = torch.zeros(130, 4)
    blocked(tile, tile.stride(0), torch.arange(130), 7, BLOCK_SIZE=3)
    assert [c[0] for c in calls] == [44, 44, 42]  # 130 rows: 3 blocks of at most 64, none tiny
    assert calls[1][2] == list(range(44, 88)) and {c[1] for c in calls} == {4} and {c[3] for c in calls} == {7}
    assert all(c[4] == {"BLOCK_SIZE": 3} for c in calls)


def test_trainer_classes_put_the_cpu_lm_head_in_row_blocks(monkeypatch):
    import trl.kernels.chunked_logprob as chunked

    for name in ("_forward_tile", "_backward_tile"):
        monkeypatch.setattr(chunked, name, getattr(getattr(chunked, name), "trl_fold", getattr(chunked, name)))
    dpo._trainer_classes()
    dpo.lm_head_tiles_in_row_blocks()  # idempotent: not wrapped twice
    for name in ("_forward_tile", "_backward_tile"):
        fold = getattr(chunked, name)
        assert hasattr(fold, "trl_fold") and not hasattr(fold.trl_fold, "trl_fold")


# ---------------------------------------------------------------------------------- the DPO step, by hand vs TRL
def _hand_logprob(model, tokenizer, messages, reply, max_length):
    """Notebook 03's inline log pi(reply | messages), with gradients."""
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    full_ids = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": reply}], tokenize=True, return_dict=False)
    ids = torch.tensor([full_ids[:max_length]])
    logits = model(input_ids=ids).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, ids[0, 1:, None]).squeeze(-1)[len(prompt_ids) - 1 :].sum()


@pytest.mark.parametrize("beta_factor, expect_equal", [(1.0, True), (2.0, False)])
def test_hand_written_dpo_gradient_equals_trls(trained, preset, pairs, workdir, beta_factor, expect_equal):
    """The gradient TRL's step follows equals the hand-written loss's (and a wrong beta is caught)."""
    result, _ = trained
    base, tok = load_for_preset(preset.with_overrides(dtype="float32"))
    policy = dpo.load_adapted(base, result.adapter_dir, trainable=True)
    batch = pairs[:4]
    policy.eval()
    pc = torch.stack([_hand_logprob(policy, tok, p["prompt"], p["chosen"], preset.max_length) for p in batch])
    pr = torch.stack([_hand_logprob(policy, tok, p["prompt"], p["rejected"], preset.max_length) for p in batch])
    rc = torch.tensor([p["ref_chosen_logps"] for p in batch])
    rr = torch.tensor([p["ref_rejected_logps"] for p in batch])
    margins = beta_factor * preset.beta * ((pc - rc) - (pr - rr))
    loss = -torch.nn.functional.logsigmoid(margins).mean()
    loss.backward()
    hand = {n: p.grad.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    trl_loss, trl_grads = dpo.trl_loss_gradients(policy, tok, batch, preset, workdir / "grad-check")
    assert set(trl_grads) == set(hand) and len(hand) == N_LORA_TENSORS
    scale = max(g.abs().max().item() for g in trl_grads.values())
    worst = max((hand[n] - trl_grads[n]).abs().max().item() for n in hand) / scale
    assert (worst < 1e-3 and abs(loss.item() - trl_loss) < 1e-4) == expect_equal, (worst, loss.item(), trl_loss)
