"""Code outside `mipo_lib.methods` that used to name methods reads the registry: the DPO launcher's `--method`
choices and `pipeline.pmi_before_after`'s methods (the results table and training curves are tested with stats and
plots). No model is loaded."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pandas as pd
import pytest

from mipo_lib.experiments import launch_dpo, pipeline
from mipo_lib import methods
from mipo_lib.config import get_preset
from mipo_lib.errors import MipoError


@pytest.fixture
def long_mipo():
    method = methods.register_method("MIPO-long", slug="mipo_long", training="dpo", colour="#123456")
    yield method
    methods.unregister_method("MIPO-long")


def test_launcher_offers_every_registered_trained_method(long_mipo, capsys):
    with pytest.raises(SystemExit):
        launch_dpo.main(["--help"])
    assert "--method {SFT,MIPO,MIPO-long}" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        launch_dpo.main(["--method", "prompting"])  # untrained: nothing to launch
    assert "invalid choice: 'prompting'" in capsys.readouterr().err


def test_pmi_before_after_needs_an_untrained_before_and_trained_after():
    preset = get_preset("smoke", n_test_prompts=4)
    records = pd.DataFrame({"method": ["prompting"], "seed": [0], "example_id": ["x"], "group": ["g"], "response": ["r"]})
    with pytest.raises(MipoError, match="untrained method"):
        pipeline.pmi_before_after(preset, records, before="MIPO")
    with pytest.raises(MipoError, match="has no training stage"):
        pipeline.pmi_before_after(preset, records, after=["CAD"])
