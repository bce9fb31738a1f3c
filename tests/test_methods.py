"""The method registry: one entry per method, read by the pipeline, the statistics tables and the figures.

A dummy method (greedy, context in the prompt, untrained: `prompting` under another name) is registered for a test and
removed after it; it must show up everywhere a built-in method does, in its own colour."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402

from mipo_lib import methods  # noqa: E402
from mipo_lib.experiments import pipeline  # noqa: E402
from mipo_lib.analysis import plots, stats  # noqa: E402
from mipo_lib.config import get_preset  # noqa: E402
from mipo_lib.errors import MipoError  # noqa: E402

DUMMY = "dummy prompting"
DUMMY_COLOUR = "#123456"
BUILT_IN = ("base (no context)", "prompting", "SFT", "MIPO", "CAD")


@pytest.fixture
def dummy():
    method = methods.register_method(DUMMY, slug="dummy", colour=DUMMY_COLOUR)
    yield method
    methods.unregister_method(DUMMY)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _records(names: tuple[str, ...], n_examples: int = 24) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for method in names:
        for seed in (0, 1):
            for e in range(n_examples):
                n_words = int(rng.integers(3, 12))
                rows.append({"task": "personalization", "method": method, "seed": seed, "example_id": f"ex{e}",
                             "group": ("short", "digit")[e % 2], "score": float(rng.random() < 0.4),
                             "response": " ".join(f"w{rng.integers(0, 30)}" for _ in range(n_words)), "n_words": n_words})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------------ registry
def test_built_in_methods_in_display_order():
    assert methods.names() == BUILT_IN
    assert {m.name: m.training for m in methods.trained()} == {"SFT": "sft", "MIPO": "dpo"}
    assert [m.name for m in methods.all_methods() if m.deterministic] == ["base (no context)", "prompting", "CAD"]
    assert [m.name for m in methods.all_methods() if not m.with_context] == ["base (no context)"]
    assert [m.name for m in methods.all_methods() if m.decoding == "cad"] == ["CAD"]
    assert len({m.slug for m in methods.all_methods()}) == len(BUILT_IN)


def test_register_and_unregister(dummy):
    assert methods.names() == (*BUILT_IN, DUMMY)
    assert methods.get_method(DUMMY) == dummy and dummy.deterministic and dummy.with_context
    assert plots.PALETTE[DUMMY] == DUMMY_COLOUR and DUMMY in plots.PALETTE and len(plots.PALETTE) == len(BUILT_IN) + 1
    methods.unregister_method(DUMMY)
    assert methods.names() == BUILT_IN and DUMMY not in plots.PALETTE
    methods.register_method(DUMMY, slug="dummy", colour=DUMMY_COLOUR)  # for the fixture to remove


@pytest.mark.parametrize("kwargs,message", [
    ({"name": "MIPO"}, "already registered"),
    ({"slug": "mipo"}, "taken by 'MIPO'"),
    ({"slug": "Bad Slug"}, "file-safe"),
    ({"slug": "with-dash"}, "file-safe"),
    ({"training": "ppo"}, "training 'ppo' is unknown"),
    ({"decoding": "beam"}, "decoding 'beam' is unknown"),
    ({"decoding": "cad", "with_context": False}, "with_context=True"),
    ({"colour": "red"}, "#rrggbb"),
    ({"trainer_args": {"loss_type": "ipo"}}, "has trainer_args but no training"),
    ({"training": "dpo", "trainer_args": {"loss_type": ["ipo"]}}, "must be a string, number, bool or tuple"),
])
def test_register_rejects_with_a_fix(kwargs, message):
    args = {"name": "new", "slug": "new", "colour": "#000000", **kwargs}
    with pytest.raises(MipoError, match=message):
        methods.register_method(args.pop("name"), **args)
    assert methods.names() == BUILT_IN


def test_unknown_method_names_the_registered_ones():
    with pytest.raises(MipoError, match="registered: base .* register_method"):
        methods.get_method("DPO")


# --------------------------------------------------------------------------------------- tables and figures read it
def test_dummy_method_in_stats_tables(dummy):
    records = _records(("zzz unregistered", DUMMY, "MIPO", "prompting"))
    expected = ["prompting", "MIPO", DUMMY, "zzz unregistered"]  # registry order, unregistered ones last
    assert stats.ordered_methods(records["method"]) == expected
    assert stats.summary_table(records, n_boot=200)["method"].tolist() == expected
    assert stats.per_seed_metrics(records)["method"].drop_duplicates().tolist() == expected
    assert stats.per_group_rates(records, n_boot=200)["method"].drop_duplicates().tolist() == expected
    assert stats.diversity_table(records)["method"].drop_duplicates().tolist() == expected


def _colours_of(fig) -> set[str]:
    """Every face, edge and line colour drawn on the figure's axes, as '#rrggbb'."""
    found = set()
    for ax in fig.axes:
        for artist in [*ax.patches, *ax.lines, *ax.collections]:
            for get in ("get_facecolor", "get_edgecolor", "get_color"):
                if hasattr(artist, get):
                    value = getattr(artist, get)()
                    values = value if isinstance(value, np.ndarray) and value.ndim == 2 else [value]
                    found |= {to_hex(v) for v in values}
    return found


def test_dummy_method_in_figures_with_its_colour(dummy):
    records = _records(("prompting", "MIPO", DUMMY))
    meta = {"preset": "smoke", "model": "tiny", "task": "personalization"}
    figures = {
        "rates": plots.plot_method_rates(records, meta, n_boot=200),
        "per group": plots.plot_per_group(records, meta, n_boot=200),
        "diversity": plots.plot_diversity(stats.diversity_table(records), meta),
    }
    for name, fig in figures.items():
        assert DUMMY_COLOUR in _colours_of(fig), name
    labels = [t.get_text() for t in figures["rates"].axes[0].get_xticklabels()]
    assert labels == ["prompting", "MIPO", DUMMY]
    without = plots.plot_method_rates(_records(("prompting", "MIPO")), meta, n_boot=200)
    assert DUMMY_COLOUR not in _colours_of(without)  # the check above can fail


# ------------------------------------------------------------------------------------ an adapter is what trained it
@pytest.fixture
def mipo_cad():
    method = methods.register_method("MIPO+CAD", slug="mipo_cad", training="dpo", decoding="cad", colour="#c44e52")
    yield method
    methods.unregister_method("MIPO+CAD")


def test_a_method_trained_like_mipo_shares_its_adapter(mipo_cad):
    """MIPO+CAD trains exactly as MIPO does and only decodes differently: one adapter (key and folder) serves both."""
    preset = get_preset("smoke")
    for seed in (0, 1):
        assert pipeline.training_key(preset, "MIPO+CAD", seed).values == pipeline.training_key(preset, "MIPO", seed).values
        assert pipeline.adapter_dir(preset, "MIPO+CAD", seed) == pipeline.adapter_dir(preset, "MIPO", seed)
    assert pipeline.adapter_dir(preset, "MIPO", 0) != pipeline.adapter_dir(preset, "MIPO", 1)
    assert pipeline.evaluation_key(preset, "MIPO+CAD", 0) != pipeline.evaluation_key(preset, "MIPO", 0)  # decodes apart


def test_trainer_arguments_are_part_of_the_adapter_key():
    methods.register_method("MIPO-IPO", slug="mipo_ipo", training="dpo", trainer_args={"loss_type": "ipo"},
                            colour="#123456")
    try:
        preset = get_preset("smoke")
        ipo, mipo = (pipeline.training_key(preset, m, 0) for m in ("MIPO-IPO", "MIPO"))
        assert ipo.values["trainer_args"] == {"loss_type": "ipo"} and mipo.values["trainer_args"] == {}
        assert ipo.digest != mipo.digest and "loss_type=ipo" in ipo.label
        assert pipeline.adapter_dir(preset, "MIPO-IPO", 0) != pipeline.adapter_dir(preset, "MIPO", 0)
        assert methods.get_method("MIPO-IPO").trainer.arguments == {"loss_type": "ipo"}
    finally:
        methods.unregister_method("MIPO-IPO")


def test_the_key_never_names_the_method():
    key = pipeline.training_key(get_preset("smoke"), "MIPO", 0)
    assert "MIPO" not in key.label and "MIPO" not in str(key.values.values())
    assert key.values["training"] == "dpo"


def test_opt_in_methods_are_registered_but_not_in_the_default_lists():
    assert methods.get_method("MIPO-InfoNCE").training == "infonce"
    assert methods.names() == BUILT_IN and "MIPO-InfoNCE" not in [m.name for m in methods.all_methods()]
    assert methods.names(opt_in=True) == (*BUILT_IN, "MIPO-InfoNCE", "MIPO (full fine-tuning)")
    assert [m.name for m in methods.trained(opt_in=True)] == ["SFT", "MIPO", "MIPO-InfoNCE", "MIPO (full fine-tuning)"]
    assert "MIPO (full fine-tuning)" not in methods.names()


# ----------------------------------------------------------------------------------------------- pipeline reads it
@pytest.mark.usefixtures("one_thread")
def test_pipeline_evaluates_a_registered_method(dummy, tmp_path, monkeypatch):
    """Greedy, context in the prompt, no training: the pipeline must evaluate it exactly like `prompting`, once."""
    monkeypatch.setenv("MIPO_RUNS_DIR", str(tmp_path / "runs"))
    preset = get_preset("smoke", n_test_prompts=6)
    ours = [pipeline.evaluate_method(preset, DUMMY, seed, progress=False) for seed in (0, 1)]
    theirs = pipeline.evaluate_method(preset, "prompting", 0, progress=False)
    assert ours[0].response.tolist() == ours[1].response.tolist() == theirs.response.tolist()
    assert set(ours[1].method) == {DUMMY} and set(ours[1].seed) == {1}
    stored = list((tmp_path / "runs").rglob("dummy*.jsonl"))
    assert len(stored) == 1, stored  # deterministic: evaluated once, repeated per seed
