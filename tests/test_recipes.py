"""Stop-when-learned and the faster recipes: the LR schedule, the fixed-batch early-stopping rule, the
embedding average, the training clock, and the time-to-quality definitions (tiny configs)."""

import csv
import json
import math

import pytest
import torch
from test_main import FAST, args, train

from evaluation.time_to_quality import bootstrap_ci, plateau, summarize, time_to_target
from ldm.early_stopping import FixedBatch, plateaued
from ldm.embedding_ema import EmbeddingEMA
from ldm.lr_scheduler import LambdaWarmUpCosineScheduler
from ldm.modules.embedding_formats import read_embeddings

OBSERVE = ["lightning.callbacks.early_stopping.target=ldm.early_stopping.ObjectiveEarlyStopping",
           "lightning.callbacks.early_stopping.params.every=2",
           "lightning.callbacks.early_stopping.params.window=2",
           "lightning.callbacks.early_stopping.params.batch_size=2",
           "lightning.callbacks.early_stopping.params.stop=false"]


def test_warm_up_cosine_schedule_values():
    s = LambdaWarmUpCosineScheduler(warm_up_steps=10, lr_min=0.1, lr_max=3.0, lr_start=0.1, max_decay_steps=110)
    assert s(0) == pytest.approx(0.1) and s(5) == pytest.approx(1.55)  # linear warm-up
    assert s(10) == pytest.approx(3.0)  # the peak
    assert s(60) == pytest.approx(0.1 + 0.5 * 2.9 * (1 + math.cos(math.pi / 2)))  # half way down the cosine
    assert s(110) == pytest.approx(0.1) and s(500) == pytest.approx(0.1)  # the floor, then constant
    with pytest.raises(ValueError, match="max_decay_steps"):
        LambdaWarmUpCosineScheduler(10, 0.1, 1.0, 0.1, max_decay_steps=5)
    unset = LambdaWarmUpCosineScheduler(10, 0.1, 1.0, 0.1)
    with pytest.raises(ValueError, match="max_steps"):
        unset(3)


def test_scheduler_config_drives_the_embedding_learning_rate(tiny, tmp_path):
    schedule = ["model.params.scheduler_config.target=ldm.lr_scheduler.LambdaWarmUpCosineScheduler",
                "model.params.scheduler_config.params.warm_up_steps=2",
                "model.params.scheduler_config.params.lr_start=0.5",
                "model.params.scheduler_config.params.lr_max=2.0",
                "model.params.scheduler_config.params.lr_min=0.25",
                "model.params.scheduler_config.params.max_decay_steps=null"]
    run = train(args(tiny, tmp_path / "logs", *schedule, steps=6))
    (scheduler,) = run.trainer.lr_scheduler_configs
    base = run.model.learning_rate
    # after 6 optimizer steps the multiplier is the schedule's value at step 6 = max_steps: the floor
    assert scheduler.scheduler.get_last_lr()[0] == pytest.approx(base * 0.25)
    lrs = [float(r["lr-AdamW"]) for r in csv.DictReader(open(run.logdir / "csv" / "version_0" /
                                                                           "metrics.csv")) if r.get("lr-AdamW")]
    assert lrs[0] == pytest.approx(base * 0.5) and max(lrs) == pytest.approx(base * 2.0)


def test_stop_rule_fires_on_a_flat_curve_and_not_on_a_falling_one():
    rule = {"window": 2, "variance_ratio": 0.2, "threshold": 0.02}
    flat = [1.0, 0.6, 0.5, 0.501, 0.499, 0.5, 0.5005]  # fell, then flat
    assert plateaued(flat, **rule)
    assert not plateaued(flat[:3], **rule)  # too few evaluations to compare two windows
    falling = [1.0 * 0.9**k for k in range(8)]  # still falling 19% per window
    assert not plateaued(falling, **rule)
    assert plateaued([1.0 * 0.995**k for k in range(12)], window=2, variance_ratio=0.2, threshold=0.02)  # < 2%
    unmoved = [0.5, 0.52, 0.49, 0.51, 0.5, 0.52, 0.49, 0.51]  # wobbles, never moved: not learned yet
    assert not plateaued(unmoved, **rule)
    wobbly_end = [1.0, 0.6, 0.5, 0.5, 0.4, 0.6]  # the last window wobbles as much as the whole run moved
    assert not plateaued(wobbly_end, **rule)
    assert plateaued([1.0, 1.0, 1.3, 1.3], **rule)  # a loss that rose and holds is not falling: stop


def test_fixed_batch_loss_is_deterministic(tiny, tmp_path):
    run = train(args(tiny, tmp_path / "logs", steps=1))
    model, dataset = run.model, run.trainer.datamodule.datasets["train"]
    state = torch.random.get_rng_state()
    a = FixedBatch(model, dataset, batch_size=2, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)  # the run's random stream is untouched
    b = FixedBatch(model, dataset, batch_size=2, seed=5)
    assert a.loss(model) == a.loss(model) == b.loss(model)
    assert FixedBatch(model, dataset, batch_size=2, seed=6).loss(model) != a.loss(model)


@pytest.mark.slow
def test_early_stopping_curve_is_the_same_after_a_resume_and_leaves_training_alone(tiny, tmp_path):
    plain = train(args(tiny, tmp_path / "plain", steps=8))
    straight = train(args(tiny, tmp_path / "a", *OBSERVE, steps=8))
    first = train(args(tiny, tmp_path / "b", *OBSERVE, steps=4))
    resumed = train(["--resume", str(first.logdir), "--max_steps", "8", "--no-test", "-t", *FAST])
    curve = json.loads((straight.logdir / "early_stopping.json").read_text())
    again = json.loads((resumed.logdir / "early_stopping.json").read_text())
    assert curve["steps"] == [2, 4, 6, 8] and again["steps"] == curve["steps"]
    assert again["losses"] == curve["losses"] and again["stopped_at"] == curve["stopped_at"]
    vector = read_embeddings(straight.embeddings).vectors["*"]
    assert torch.equal(read_embeddings(plain.embeddings).vectors["*"], vector)  # observing changes nothing


def test_early_stopping_stops_the_run_and_keeps_the_averaged_vector(tiny, tmp_path):
    # variance_ratio and threshold 10: the rule fires at the first comparison (step 8, 4 evaluations)
    stop = [o.replace("stop=false", "stop=true") for o in OBSERVE] + [
        "lightning.callbacks.early_stopping.params.variance_ratio=10",
        "lightning.callbacks.early_stopping.params.threshold=10",
        "lightning.callbacks.early_stopping.params.average=3"]
    run = train(args(tiny, tmp_path / "logs", *stop, steps=20))
    assert run.global_step == 8
    record = json.loads((run.logdir / "early_stopping.json").read_text())
    assert record["stopped_at"] == 8 and record["averaged_steps"] == [4, 6, 8]
    # the vectors at steps 4, 6, 8 of plain runs (training with the callback is the same until it stops)
    plain = [read_embeddings(train(args(tiny, tmp_path / f"plain{n}", steps=n)).embeddings).vectors["*"]
             for n in (4, 6, 8)]
    expected = torch.stack(plain).mean(0)
    kept = read_embeddings(run.ckptdir / "embeddings_early_stop.pt").vectors["*"]
    assert torch.allclose(kept, expected, rtol=0, atol=1e-7) and not torch.allclose(kept, plain[-1])
    assert torch.equal(read_embeddings(run.embeddings).vectors["*"], kept)  # embeddings.pt holds it too
    assert sorted(run.snapshots)[-1] == 8
    assert read_embeddings(run.ckptdir / "embeddings_early_stop.safetensors").vectors["*"].equal(kept)


def test_observing_writes_the_averaged_vector_and_trains_on(tiny, tmp_path):
    observe = OBSERVE + ["lightning.callbacks.early_stopping.params.variance_ratio=10",
                         "lightning.callbacks.early_stopping.params.threshold=10"]
    run = train(args(tiny, tmp_path / "logs", *observe, steps=10))
    assert run.global_step == 10 and json.loads((run.logdir / "early_stopping.json").read_text())["stopped_at"] == 8
    kept = read_embeddings(run.ckptdir / "embeddings_early_stop.pt").vectors["*"]
    assert not torch.equal(read_embeddings(run.embeddings).vectors["*"], kept)  # the raw vector trained on


def test_early_stopping_flag_adds_the_callback(tiny, tmp_path):
    run = train(args(tiny, tmp_path / "logs", "--early_stopping", steps=2))
    found = [c for c in run.trainer.callbacks if type(c).__name__ == "ObjectiveEarlyStopping"]
    assert len(found) == 1 and found[0].every == 1  # max_steps 2 // 60, at least 1


def test_embedding_average_is_written_beside_the_raw_vectors(tiny, tmp_path):
    ema = ["lightning.callbacks.embedding_ema.target=ldm.embedding_ema.EmbeddingEMA",
           "lightning.callbacks.embedding_ema.params.decay=0.5"]
    run = train(args(tiny, tmp_path / "logs", *ema, steps=10))
    ckpt = run.ckptdir
    raw = read_embeddings(ckpt / "embeddings.pt").vectors["*"]
    averaged = read_embeddings(ckpt / "embeddings_ema.pt").vectors["*"]
    assert (ckpt / "embeddings_ema_gs-10.pt").is_file()
    callback = next(c for c in run.trainer.callbacks if isinstance(c, EmbeddingEMA))
    assert torch.equal(averaged, callback.shadow["*"]) and not torch.equal(averaged, raw)
    live = run.model.embedding_manager.string_to_param_dict["*"].detach()
    assert torch.equal(live, raw)  # saving the average put the raw vector back


def test_embedding_average_formula():
    class Manager(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.string_to_param_dict = torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.zeros(1, 2))})

    class Module:
        embedding_manager = Manager()

    module, callback = Module(), EmbeddingEMA(decay=0.75)
    callback.on_train_start(None, module)
    vector = module.embedding_manager.string_to_param_dict["*"]
    for value in (4.0, 8.0):
        with torch.no_grad():
            vector.fill_(value)
        callback.on_train_batch_end(None, module, None, None, 0)
    # 0 -> 0.25 * 4 = 1 -> 0.75 * 1 + 0.25 * 8 = 2.75
    assert torch.allclose(callback.shadow["*"], torch.full((1, 2), 2.75))


def test_training_clock_counts_every_step(tiny, tmp_path):
    clock = ["lightning.callbacks.training_clock.target=ldm.training_clock.TrainingClock"]
    run = train(args(tiny, tmp_path / "logs", *clock, steps=4))
    seconds = {int(k): v for k, v in json.loads((run.logdir / "training_clock.json").read_text())["seconds"].items()}
    assert sorted(seconds) == [1, 2, 3, 4] and all(b > a > 0 for a, b in zip(list(seconds.values()),
                                                                                list(seconds.values())[1:]))


def test_time_to_target_definitions():
    steps = [0, 10, 20, 30, 40, 50, 60]
    assert time_to_target(steps, [0.1, 0.7, 0.4, 0.7, 0.8, 0.7, 0.75], 0.6) == 30  # fell back at 20: not there
    assert time_to_target(steps, [0.1, 0.7, 0.7, 0.7, 0.8, 0.7, 0.5], 0.6) is None  # below at the end
    assert plateau(steps, [0, 0, 0, 0, 0.6, 0.8, 1.0], total_steps=60) == pytest.approx(0.8)  # steps >= 40
    low, high = bootstrap_ci([0, 1] * 32)
    assert low < 0.5 < high and bootstrap_ci([0, 1] * 32) == (low, high)


def test_summary_targets_and_ratios():
    def rows(recipe, rates):
        return [{"recipe": recipe, "concept": "ring", "seed": 0, "step": 10 * i, "seconds": 2.0 * i,
                 "concept_rate": rate, "joint_rate": rate, "concept_rate_ci_low": 0.0, "concept_rate_ci_high": 1.0,
                 "joint_rate_ci_low": 0.0, "joint_rate_ci_high": 1.0} for i, rate in enumerate(rates)]

    base = rows("baseline", [0.1, 0.3, 0.5, 0.7, 0.8, 0.8, 0.8])
    fast = rows("fast", [0.1, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8])
    stopped = {"stopped_at": 30, "concept_rate": 0.78, "concept_rate_ci": [0.7, 0.85], "joint_rate": 0.5,
               "joint_rate_ci": [0.4, 0.6]}
    out = summarize(base + fast, {("baseline", "ring", 0): stopped}, total_steps=60)
    assert out["targets"]["ring/concept_rate"] == pytest.approx(0.75)  # baseline plateau 0.8 minus 0.05
    line = next(x for x in out["table"] if x["recipe"] == "fast")["concept_rate"]
    assert line["steps_to_target"] == 10 and line["steps_to_target_ratio"] == pytest.approx(0.25)  # base: 40
    assert line["seconds_to_target"] == 2.0 and line["plateau_minus_baseline"] == pytest.approx(0.0)
    stop = next(r for r in out["runs"] if r["recipe"] == "baseline")["early_stopping"]
    assert stop == {"stopped_at": 30, "stopped": True, "fraction": 0.5,  # plateau 0.8: 0.78 is within 0.05, 0.5 is not
                    "concept_rate_at_stop": 0.78, "concept_rate_at_stop_ci": [0.7, 0.85],
                    "concept_rate_near_plateau": True, "joint_rate_at_stop": 0.5,
                    "joint_rate_at_stop_ci": [0.4, 0.6], "joint_rate_near_plateau": False}


@pytest.mark.slow
def test_time_to_quality_benchmark_tiny(tmp_path):
    """The benchmark end to end on the bundled toy model: 1 recipe, 1 seed, 4 steps, 2 snapshots + the start."""
    from conftest import load_script

    script = load_script("time_to_quality")
    out = tmp_path / "ttq"
    argv = ["--recipes", "baseline", "--concepts", "ring", "--seeds", "0", "--steps", "4", "--every", "2",
            "--samples", "4", "--ddim_steps", "2", "--out", str(out)]
    assert script.run_script("time_to_quality.py", script.parser(), script.run, argv) == 0
    rows = list(csv.DictReader(open(out / "snapshots.csv")))
    assert [int(r["step"]) for r in rows] == [0, 2, 4]
    assert float(rows[0]["seconds"]) == 0.0 and float(rows[2]["seconds"]) > float(rows[1]["seconds"]) > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["table"][0]["recipe"] == "baseline" and "ring/concept_rate" in summary["targets"]
    assert (out / "curves.png").is_file()
    stopped = json.loads((out / "runs" / "baseline" / "ring_seed0" / "stopped.json").read_text())
    assert stopped["curve"]["steps"] == [1, 2, 3, 4] and stopped["stopped_at"] is None  # 4 steps: too few to stop
    run_summary = summary["runs"][0]["early_stopping"]
    assert run_summary["stopped"] is False and run_summary["stopped_at"] == 4
    assert run_summary["concept_rate_at_stop"] == stopped["concept_rate"]
    # common noise: scoring the same embedding again gives the same figures; the run is reused, not retrained
    cache = json.loads((out / "scores" / "baseline" / "ring_seed0.json").read_text())["scores"]
    from ldm.loading import load_model
    from ldm.toy.scorer import load_scorer

    model = load_model("configs/toy/invert.yaml", "models/toy/toy_ldm.safetensors", attention="sdpa")
    record = json.loads((out / "runs" / "baseline" / "ring_seed0" / "record.json").read_text())
    model.embedding_manager.load(record["snapshots"]["4"])
    again = script.score_embedding(model, load_scorer("assets/toy/scorer.safetensors"), "ring", 4, 2)
    assert json.loads(json.dumps(again)) == cache["4"]
    mtime = (out / "runs" / "baseline" / "ring_seed0" / "record.json").stat().st_mtime_ns
    assert script.run_script("time_to_quality.py", script.parser(), script.run, argv) == 0
    assert (out / "runs" / "baseline" / "ring_seed0" / "record.json").stat().st_mtime_ns == mtime
