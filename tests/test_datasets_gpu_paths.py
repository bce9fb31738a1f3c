"""The paper's datasets end to end on fixtures: each GPU task path (GSM8K, SVAMP, ARC, PRISM) builds pairs, trains one
DPO step and evaluates, offline, with the smoke preset's tiny model; and the GPU presets pick up each task's official
settings."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

import pytest

from mipo_lib import config, evaluate, tasks
from mipo_lib.experiments import pipeline
from mipo_lib.analysis import stats
from mipo_lib.config import get_preset
from mipo_lib.errors import MipoError
from mipo_lib.models import load_for_preset
from mipo_lib.tasks.datasets import ARCTask, GSM8KTask, PRISMTask, SVAMPTask

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "fixtures"
GSM8K, SVAMP, ARC, PRISM = (FIXTURES / f for f in ("gsm8k_sample.jsonl", "svamp_sample.json", "arc_sample.jsonl", "prism_sample.jsonl"))

# n_shots=1: the smoke model reads 1024 byte tokens, the official 8-shot prompt is 2,500 characters
FACTORIES = {
    "fx_gsm8k": lambda: GSM8KTask(train_path=GSM8K, test_path=GSM8K, n_shots=1),
    "fx_svamp": lambda: SVAMPTask(train_path=SVAMP, test_path=SVAMP, n_shots=1, gsm8k_train_path=GSM8K),
    "fx_arc": lambda: ARCTask("ARC-Challenge", train_path=ARC, test_path=ARC),
    "fx_prism": lambda: PRISMTask(path=PRISM),
}


@pytest.fixture
def runs(tmp_path, monkeypatch):
    monkeypatch.setenv("MIPO_RUNS_DIR", str(tmp_path / "runs"))
    return tmp_path / "runs"


@pytest.fixture
def fixture_task(request):
    name = request.param
    tasks.register_task(name, FACTORIES[name])
    yield name
    tasks.unregister_task(name)


@pytest.mark.slow
@pytest.mark.parametrize("fixture_task", list(FACTORIES), indirect=True)
def test_dataset_pairs_one_dpo_step_and_evaluation(fixture_task, runs, one_thread):
    task = tasks.get_task(fixture_task)
    negative = "context_drop" if fixture_task == "fx_prism" else "random_prompt"
    preset = get_preset("smoke", task=fixture_task, negative=negative, n_train_prompts=4, n_test_prompts=3,
                        batch_size=4, max_length=1024, warmup_ratio=0.0, seeds=[0])
    pairs = pipeline.pairs_for_seed(preset, 0, progress=False)
    assert len(pairs) == 4
    assert all(p["prompt"] == task.prompt(e) for p, e in zip(pairs, task.examples("train", 4, seed=0)))
    if negative == "random_prompt":
        assert all(p["negative_source"] != p["example_id"] for p in pairs)  # a derangement: never its own reply
    else:  # the official PRISM pair: y- sampled without the requirements, stored under the augmented prompt
        assert all("Please respect" not in p["negative_prompt"][0]["content"] for p in pairs)
        assert all("Please respect" in p["prompt"][0]["content"] for p in pairs)

    trained = pipeline.train_for_seed(preset, "MIPO", 0, progress=False)
    # one DPO step at the full learning rate: LoRA's B matrices move (A follows from the second step, B starts at 0)
    assert trained.log["step"].max() == 1
    assert all(changed for name, changed in trained.lora_changed.items() if "lora_B" in name)

    records = pipeline.evaluate_method(preset, "MIPO", 0, progress=False)
    assert records.example_id.tolist() == [e.id for e in task.examples("test", 3)]
    if fixture_task == "fx_prism":
        assert records.score.isna().all()  # judged by an LLM: see test_prism_judge_on_smoke_records
    else:
        assert set(records.score) <= {0.0, 1.0}


@pytest.mark.slow
@pytest.mark.parametrize("fixture_task", ["fx_prism"], indirect=True)
def test_prism_judge_on_smoke_records(fixture_task, runs, one_thread, monkeypatch):
    """The official judge path with the tiny model as judge: judged records, references added, both win rates."""
    preset = get_preset("smoke", task=fixture_task, n_train_prompts=4, n_test_prompts=2, max_length=1024, seeds=[0])
    examples = tasks.get_task(fixture_task).examples("test", 2)
    records = pipeline.evaluate_all(preset, [0], methods=["prompting"], progress=False)
    model, tok = load_for_preset(preset)
    judged = evaluate.judge_records(records, examples, model, tok, preset, progress=False)
    ref = judged[judged.method == evaluate.REFERENCE]
    assert ref.response.tolist() == [e.meta["reference"] for e in examples]
    assert judged.score.dropna().between(1, 5).all()
    table = stats.win_tie_table(judged.fillna({"score": 3.0}), "prompting", evaluate.REFERENCE, n_boot=50)
    assert {"win-or-tie", "strict win"} <= set(table.metric)

    def fake_judge(model, tok, examples, responses, preset, progress=True, seed=0):
        return [5.0 if r.startswith("Play") else None for r in responses]  # only the first reference is scored

    monkeypatch.setattr(evaluate, "llm_judge_scores", fake_judge)
    judged = evaluate.judge_records(records, examples, model, tok, preset, progress=False)
    assert judged[judged.method == evaluate.REFERENCE].score.tolist()[0] == 5.0
    assert judged[judged.method == "prompting"].score.isna().all()  # skipped replies stay NaN, never a win


def test_gpu_presets_take_each_tasks_official_settings():
    expected = {
        "gsm8k": {"temperature": 0.1, "top_p": 0.9, "n_test_prompts": 200, "negative": "random_prompt"},
        "svamp": {"temperature": 0.1, "top_p": 0.9, "n_test_prompts": 300, "negative": "random_prompt"},
        "arc_easy": {"temperature": 1.0, "top_p": 0.9, "n_test_prompts": 500, "negative": "random_prompt"},
        "arc_challenge": {"temperature": 1.0, "top_p": 0.9, "n_test_prompts": 500, "negative": "random_prompt"},
        "prism": {"temperature": 0.1, "top_p": 0.9, "n_test_prompts": 200, "negative": "context_drop",
                  "max_new_tokens": 512, "eval_max_new_tokens": 512},
    }
    for name in ("t4", "paper"):
        assert config.PRESETS[name].task_defaults
        for task, fields in expected.items():
            preset = get_preset(name, task=task)
            assert {k: getattr(preset, k) for k in fields} == fields, (name, task)
            for field in tasks.task_settings(task):
                config.field_type(field)  # every official setting is a preset field
        assert get_preset(name, task="gsm8k", temperature=0.7, n_test_prompts=50).temperature == 0.7  # caller wins
        assert get_preset(name, task="gsm8k", task_defaults=False).temperature == config.PRESETS[name].temperature
        assert get_preset(name).temperature == config.PRESETS[name].temperature  # personalization has no official set
    assert get_preset("t4", task="gsm8k").max_length == 1536  # the 8-shot prompt is ~800 tokens
    assert not config.PRESETS["smoke"].task_defaults and get_preset("smoke", task="gsm8k", negative="random_prompt").temperature == 0.8
    assert get_preset("smoke", task="gsm8k", negative="random_prompt", task_defaults=True).temperature == 0.1
    with pytest.raises(MipoError, match="unknown task"):
        get_preset("t4", task="mmlu")
