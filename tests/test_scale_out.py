"""Scale-out: several processes share the pairs' generation and scoring and give the one-process result byte for byte.

The fast tests play the ranks one after the other in this process (`mipo_lib.pairs`' shares, shards and merge); the
slow one launches the DPO stage with `accelerate launch` on two CPU processes (gloo), pairs and training end to end,
and compares its pairs with a one-process run's."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mipo_lib import pairs as pairs_mod
from mipo_lib.config import get_preset
from mipo_lib.generate import GenerationStats
from mipo_lib.pairs import SHARD_GLOB, BatchLog, Ranks, score_plan, score_share, shard_path
from mipo_lib.scoring import pair_tokens, sequence_logprobs

ROOT = Path(__file__).resolve().parents[1]
N = 16
#: Four generation batches per stage and eight scoring batches per call: two processes get several of each.
SHARED = {"gen_batch_size": 4, "score_batch_size": 4}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def preset():
    return get_preset("smoke", n_train_prompts=N, **SHARED)


@pytest.fixture(scope="module")
def prompts(task):
    return [task.prompt(e) for e in task.examples("train", N, seed=0)]


def _shard_batches(log_path: Path, rank: int) -> set[int]:
    return {batch for _, batch in BatchLog(shard_path(log_path, rank), repair=False).done}


def test_each_rank_samples_its_share_and_the_merge_is_the_one_process_log(tiny, preset, prompts, tmp_path):
    model, tok = tiny
    one = tmp_path / "one" / "responses.jsonl"
    one.parent.mkdir()
    expected = pairs_mod._sample("positive", model, tok, prompts, preset, 0, one, Ranks(), GenerationStats(), False)

    two = tmp_path / "two" / "responses.jsonl"
    two.parent.mkdir()
    for rank in (1, 0):  # the second rank finishes first: the merged log must not depend on who did
        pairs_mod._generate_share("positive", model, tok, prompts, preset, 0, BatchLog(two, repair=rank == 0),
                                  Ranks(rank, 2), GenerationStats(), False)
    assert (_shard_batches(two, 0), _shard_batches(two, 1)) == ({0, 2}, {1, 3})  # r, r + W: each batch once
    assert not two.exists()  # the ranks write their shards only; rank 0 merges

    log = BatchLog(two)
    log.absorb(sorted(two.parent.glob(SHARD_GLOB)))
    assert two.read_bytes() == one.read_bytes()
    assert log.replies("positive", N) == expected
    assert not list(two.parent.glob(SHARD_GLOB))


def test_a_killed_rank_resumes_its_shard(tiny, preset, prompts, tmp_path):
    model, tok = tiny
    log_path = tmp_path / "responses.jsonl"
    rank0 = Ranks(0, 2)
    pairs_mod._generate_share("positive", model, tok, prompts, preset, 0, BatchLog(log_path), rank0, GenerationStats(), False)
    shard = shard_path(log_path, 0)
    first, second = shard.read_text().splitlines()
    shard.write_text(first + "\n" + second[: len(second) // 2])  # killed while writing its second batch

    stats = GenerationStats()
    pairs_mod._generate_share("positive", model, tok, prompts, preset, 0, BatchLog(log_path), rank0, stats, False)
    assert stats.batches == 1 and _shard_batches(log_path, 0) == {0, 2}  # only the torn batch again


def test_scoring_shares_give_the_one_process_log_probs_bit_for_bit(tiny, preset, prompts):
    model, tok = tiny
    responses = [" ".join(["word"] * (3 * i + 1)) for i in range(N)]  # lengths differ: batches pad differently
    whole, lengths = sequence_logprobs(model, tok, prompts, responses, max_length=preset.max_length,
                                       batch_size=preset.score_batch_size)
    sums, counted = pairs_mod._score(model, tok, prompts, responses, preset, Ranks(), False, "scoring")
    assert sums.tolist() == whole.tolist() and counted.tolist() == lengths.tolist()

    plan = score_plan([pair_tokens(tok, p, r, preset.max_length) for p, r in zip(prompts, responses)],
                      preset.score_batch_size)
    merged: dict[int, float] = {}
    for rank in (0, 1):
        mine = [plan[b] for b in sorted(Ranks(rank, 2).share(len(plan)))]
        merged.update(score_share(model, tok, prompts, responses, mine, preset.max_length))
    assert [merged[i] for i in range(N)] == whole.tolist()
    # why the ranks keep one process's batches: other batches move the last bits
    regrouped, _ = sequence_logprobs(model, tok, prompts, responses, max_length=preset.max_length, batch_size=3)
    assert regrouped.tolist() != whole.tolist()
    assert regrouped.tolist() == pytest.approx(whole.tolist(), rel=1e-5)


@pytest.mark.slow
def test_two_cpu_processes_build_the_one_process_pairs_and_train(tmp_path, monkeypatch):
    """`accelerate launch` with two CPU processes: both generate and score, rank 0 writes pairs byte-identical to a
    one-process run's, and the two train as one data-parallel group (half the steps of one process)."""
    from mipo_lib.experiments.pipeline import pairs_for_seed
    from mipo_lib.pairs import pairs_dir

    env = dict(os.environ, MIPO_RUNS_DIR=str(tmp_path / "two"), PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    config = ROOT / "mipo_lib" / "accelerate" / "cpu2.yaml"
    sets = [arg for field, value in SHARED.items() for arg in ("--set", f"{field}={value}")]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
           "-m", "mipo_lib.experiments.launch_dpo", "--preset", "smoke", "--seed", "0", *sets]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("MIPO seed 0:") == 1  # rank 0 reports
    assert "MIPO seed 0: 2 steps" in proc.stdout  # 16 pairs, batch 4 on each of 2 processes (one process: 4 steps)

    preset = get_preset("smoke", **SHARED)
    monkeypatch.setenv("MIPO_RUNS_DIR", str(tmp_path / "two"))
    two = pairs_dir(preset, 0)
    assert json.loads((two / "manifest.json").read_text())["generated_batches_by_process"] == [4, 4]
    assert not list(two.glob(SHARD_GLOB)) and list(two.parent.rglob("adapter_config.json"))

    monkeypatch.setenv("MIPO_RUNS_DIR", str(tmp_path / "one"))
    pairs_for_seed(preset, 0, progress=False)
    one = pairs_dir(preset, 0)
    assert json.loads((one / "manifest.json").read_text())["generated_batches_by_process"] == [8]
    for name in ("responses.jsonl", "pairs.jsonl"):
        assert (two / name).read_bytes() == (one / name).read_bytes(), name


def test_each_rank_loads_its_4bit_model_onto_its_own_gpu(monkeypatch):
    """Under `accelerate launch` (LOCAL_RANK set) a 4-bit model's device_map names the rank's GPU, not a bare "cuda"
    (GPU 0 for every rank); an explicit index and a single process are left alone. Faked: no GPU here."""
    import mipo_lib.models as models
    from transformers import AutoModelForCausalLM, AutoTokenizer

    seen = {}

    class FakeModel:
        generation_config = type("G", (), {})()

        def eval(self):
            return self

    def fake_model(path, **kwargs):
        seen.update(kwargs)
        return FakeModel()

    tokenizer = type("T", (), {"pad_token": "x", "pad_token_id": 0, "padding_side": "right"})()
    monkeypatch.setattr(models, "select_device", lambda requested=None: torch.device("cuda"))
    monkeypatch.setattr(models, "select_dtype", lambda dev, dtype: torch.float16)
    monkeypatch.setattr(models, "check_4bit_backend", lambda dev: None)
    monkeypatch.setattr(models, "nf4_config", lambda dtype: "nf4")
    monkeypatch.setattr(models, "resolve_model_path", lambda model_id: model_id)
    monkeypatch.setattr(models, "pin_chat_template_date", lambda tok: None)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda path: tokenizer)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setenv("LOCAL_RANK", "1")
    models.load_model_and_tokenizer("some/model", load_in_4bit=True)
    assert seen["device_map"] == {"": torch.device("cuda", 1)}
    assert models.process_device(torch.device("cuda", 0)) == torch.device("cuda", 0), "an explicit index is kept"
    assert models.process_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.delenv("LOCAL_RANK")
    assert models.process_device(torch.device("cuda")) == torch.device("cuda"), "one process: as before"
