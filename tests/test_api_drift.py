"""API drift: every keyword `mipo_lib.dpo` hands to TRL must exist in the installed TRL.

TRL renames and moves arguments between releases (tokenizer -> processing_class, max_prompt_length dropped, ...).
These tests read the keywords from the code itself (the config builders, and the `DPOTrainer(...)`/`SFTTrainer(...)`
calls parsed with `ast`), so they follow the module, and they fail naming the argument that drifted.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import ast
import inspect
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import trl

from mipo_lib import dpo
from mipo_lib.config import PRESETS

DPO_SOURCE = Path(dpo.__file__)


class _FakeModel:
    """Just enough of a model for the config builders (device, dtype, no quantization)."""

    def __init__(self, dtype=torch.float32, quantized=None):
        self.config = SimpleNamespace(quantization_config=quantized)
        self._p = torch.nn.Parameter(torch.zeros(1, dtype=dtype))

    def parameters(self):
        yield self._p


def _params(cls) -> set[str]:
    return set(inspect.signature(cls).parameters)


def _drift(kind: str, used: set[str], accepted: set[str], where: str) -> str:
    bad = sorted(used - accepted)
    return (
        f"TRL {trl.__version__} API drift: {kind} no longer accepts {bad} (passed by {where}); "
        "rename or drop it in mipo_lib/dpo.py and adjust the version range in pyproject.toml"
    )


# Every preset, with and without gradient checkpointing / 4-bit compute dtypes, exercises every optional key.
CASES = [
    (name, dtype, gc)
    for name in PRESETS
    for dtype in (torch.float32, torch.bfloat16, torch.float16)
    for gc in (False, True)
]


@pytest.mark.parametrize("name,dtype,gc", CASES)
def test_dpo_config_kwargs_exist(tmp_path, name, dtype, gc):
    preset = PRESETS[name].with_overrides(gradient_checkpointing=gc)
    for reuse in (True, False):
        kwargs = dpo.dpo_config_kwargs(preset, 0, tmp_path, _FakeModel(dtype), reuse_reference=reuse, progress=False)
        accepted = _params(trl.DPOConfig)
        assert set(kwargs) <= accepted, _drift("DPOConfig", set(kwargs), accepted, "dpo.dpo_config_kwargs")


@pytest.mark.parametrize("name,dtype,gc", CASES)
def test_sft_config_kwargs_exist(tmp_path, name, dtype, gc):
    preset = PRESETS[name].with_overrides(gradient_checkpointing=gc)
    kwargs = dpo.sft_config_kwargs(preset, 0, tmp_path, _FakeModel(dtype), progress=False)
    accepted = _params(trl.SFTConfig)
    assert set(kwargs) <= accepted, _drift("SFTConfig", set(kwargs), accepted, "dpo.sft_config_kwargs")


def test_configs_build_with_these_kwargs(tmp_path):
    """Beyond the names: the installed configs accept the values (types, combinations) for the smoke preset."""
    preset = PRESETS["smoke"]
    model = _FakeModel(torch.float32)
    cfg = trl.DPOConfig(**dpo.dpo_config_kwargs(preset, 0, tmp_path, model, progress=False))
    assert cfg.beta == preset.beta and cfg.precompute_ref_log_probs is True
    assert cfg.loss_type == ["sigmoid"] or cfg.loss_type == "sigmoid"
    sft = trl.SFTConfig(**dpo.sft_config_kwargs(preset, 0, tmp_path, model, progress=False))
    assert sft.completion_only_loss is True
    assert sft.max_length == preset.max_length


def _constructor_keywords(class_name: str) -> dict[str, int]:
    """Keyword names of every call `<class_name>(...)` in mipo_lib/dpo.py (a class or a local alias of it)."""
    tree = ast.parse(DPO_SOURCE.read_text())
    aliases = {class_name}
    if class_name == "DPOTrainer":
        aliases.add("PairsDPOTrainer")  # the subclass built in dpo._trainer_classes
    found: dict[str, int] = {}
    calls = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
            if name in aliases:
                calls += 1
                for kw in node.keywords:
                    assert kw.arg is not None, f"{name}(**...) in dpo.py hides its keywords from this test; spell them out"
                    found[kw.arg] = node.lineno
    assert calls, f"no call to {sorted(aliases)} found in {DPO_SOURCE.name}; update this test"
    return found


@pytest.mark.parametrize("class_name", ["DPOTrainer", "SFTTrainer"])
def test_trainer_keywords_exist(class_name):
    used = _constructor_keywords(class_name)
    assert {"model", "args", "train_dataset", "processing_class", "peft_config"} <= set(used)
    accepted = set(inspect.signature(getattr(trl, class_name).__init__).parameters) - {"self"}
    missing = sorted(set(used) - accepted)
    assert not missing, _drift(
        f"{class_name}.__init__", set(used), accepted, ", ".join(f"dpo.py line {used[k]}" for k in missing)
    )


def test_private_precompute_hook_still_exists():
    """`dpo._trainer_classes` overrides DPOTrainer._precompute_ref_logps to reuse the pairs' reference log-probs;
    if TRL renames it, the override silently stops working and training recomputes (or worse, ignores) them."""
    hook = getattr(trl.DPOTrainer, "_precompute_ref_logps", None)
    assert hook is not None, (
        f"TRL {trl.__version__}: DPOTrainer._precompute_ref_logps is gone; find its successor and update "
        "PairsDPOTrainer in mipo_lib/dpo.py"
    )
    _, pairs_trainer, _, _ = dpo._trainer_classes()
    ours = list(inspect.signature(pairs_trainer._precompute_ref_logps).parameters)
    theirs = list(inspect.signature(hook).parameters)
    assert ours == theirs, f"TRL {trl.__version__}: _precompute_ref_logps{theirs} != our override{ours}"
    assert pairs_trainer._precompute_ref_logps is not hook
    # the same hook must be what TRL calls while setting up and evaluating
    src = inspect.getsource(trl.DPOTrainer)
    assert src.count("self._precompute_ref_logps(") >= 2, "TRL no longer calls _precompute_ref_logps from __init__/evaluate"


def test_trainer_reads_reference_columns():
    """The dataset columns carrying our reference log-probs are the ones TRL's collator and loss read."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    batch = DataCollatorForPreference(pad_token_id=0)(
        [{"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5], "ref_chosen_logps": -1.5, "ref_rejected_logps": -2.5}]
    )
    assert batch["ref_chosen_logps"].tolist() == [-1.5]
    assert batch["ref_rejected_logps"].tolist() == [-2.5]
    ds = dpo.dpo_dataset([{"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b", "ref_chosen_logps": -1.0, "ref_rejected_logps": -2.0}])
    assert {"ref_chosen_logps", "ref_rejected_logps"} <= set(ds.column_names)


def test_report_to_reaches_the_configs_and_missing_loggers_fail_early(tmp_path, monkeypatch):
    """`Preset.report_to` is passed to TRL (TensorBoard optional); a logger that is not installed fails in one line
    when the arguments are built, not after the model has loaded."""
    import transformers.integrations

    from mipo_lib.errors import MipoError

    model = _FakeModel(torch.float32)
    assert dpo.dpo_config_kwargs(PRESETS["smoke"], 0, tmp_path, model, progress=False)["report_to"] == "none"
    tensorboard = PRESETS["smoke"].with_overrides(report_to="tensorboard")
    monkeypatch.setattr(transformers.integrations, "get_available_reporting_integrations", lambda: [])
    with pytest.raises(MipoError, match="tensorboard is not installed; pip install it or set report_to=none") as err:
        dpo.sft_config_kwargs(tensorboard, 0, tmp_path, model, progress=False)
    assert "\n" not in str(err.value)
    monkeypatch.setattr(transformers.integrations, "get_available_reporting_integrations", lambda: ["tensorboard"])
    kwargs = dpo.dpo_config_kwargs(tensorboard, 0, tmp_path, model, progress=False)
    assert kwargs["report_to"] == ["tensorboard"]
    assert "report_to" in _params(trl.DPOConfig) and "report_to" in _params(trl.SFTConfig)


def test_adapter_is_saved_the_trl_way():
    """`_save_adapter` uses the Trainer API TRL users know: save_model (adapter + tokenizer) and create_model_card."""
    assert callable(getattr(trl.DPOTrainer, "save_model", None)) and callable(getattr(trl.SFTTrainer, "save_model", None))
    for cls in (trl.DPOTrainer, trl.SFTTrainer):
        params = inspect.signature(cls.create_model_card).parameters
        assert {"model_name", "tags"} <= set(params), f"TRL {trl.__version__}: {cls.__name__}.create_model_card{list(params)}"


def test_trl_fused_head_still_compacts_through_use_triton():
    """`dpo.compact_lm_head_on_cpu` swaps the predicate that `add_fused_lm_head` reads to decide compaction; if TRL
    renames it or stops calling it there, the CPU speed-up would silently vanish."""
    import trl.trainer.utils as trl_utils

    assert callable(trl_utils._use_triton)
    assert "compact = _use_triton(" in inspect.getsource(trl_utils.add_fused_lm_head)


def test_trainer_still_prepares_inputs_for_the_gradient_check():
    """`dpo.trl_loss_gradients` moves a collated batch to the model's device with `Trainer._prepare_inputs`."""
    from transformers import Trainer

    assert callable(getattr(Trainer, "_prepare_inputs", None))
