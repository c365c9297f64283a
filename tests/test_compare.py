"""The comparison: statistics against hand-worked examples, variants and presets, run bookkeeping (finished, failed,
pending, resumed, mismatched), and tools/compare.py end to end at toy size (two variants x two seeds)."""
import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hdml_tf import statistics
from hdml_tf.config import ConfigError, HDMLConfig, OptimConfig, RunConfig
from hdml_tf.variants import PRESETS, parse_variant, parse_variants

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "compare_driver.py"

# Student's t quantiles t_{0.975, df} from a printed table (independent of scipy): df 2, 3, 4.
T975 = {2: 4.303, 3: 3.182, 4: 2.776}


# ------------------------------------------------------------------------------------------------ statistics
def test_paired_t_interval_hand_computed():
    # d = 1, 2, 3, 6: mean 3, s^2 = (4 + 1 + 0 + 9) / 3 = 14/3, half-width = t_{.975,3} * s / 2.
    d = [1.0, 2.0, 3.0, 6.0]
    half = T975[3] * math.sqrt(14 / 3) / 2
    low, high = statistics.t_interval(d)
    assert low == pytest.approx(3 - half, abs=2e-3) and high == pytest.approx(3 + half, abs=2e-3)
    assert (low, high) == pytest.approx((-0.4374, 6.4374), abs=1e-3)


def test_paired_difference_pairs_by_seed_and_counts_wins():
    # Seed 4 has no partner (a failed or pending run): it must not enter the pairs.
    variant = {0: 0.50, 1: 0.60, 2: 0.70, 3: 0.90}
    reference = {0: 0.40, 1: 0.60, 2: 0.40, 3: 0.30, 4: 0.10}
    d = statistics.paired_difference(variant, reference, resamples=0)
    assert d.n == 4 and d.per_seed == pytest.approx({0: 0.1, 1: 0.0, 2: 0.3, 3: 0.6})
    assert (d.better, d.worse, d.ties) == (3, 0, 1)
    assert d.mean == pytest.approx(0.25)
    s = math.sqrt(((0.1 - .25) ** 2 + .25 ** 2 + .05 ** 2 + .35 ** 2) / 3)
    assert d.sd == pytest.approx(s)
    assert (d.t_low, d.t_high) == pytest.approx((0.25 - T975[3] * s / 2, 0.25 + T975[3] * s / 2), abs=1e-3)
    assert math.isnan(d.boot_low)  # resamples=0: no bootstrap
    # scipy's own paired t-test gives the same interval.
    from scipy import stats
    seeds = [0, 1, 2, 3]
    ci = stats.ttest_rel([variant[k] for k in seeds], [reference[k] for k in seeds]).confidence_interval(0.95)
    assert (d.t_low, d.t_high) == pytest.approx((ci.low, ci.high))
    assert statistics.paired_difference({0: 1.0}, {1: 1.0}) is None


def test_summary_of_one_variant():
    s = statistics.summarize([0.1, 0.2, 0.3])  # mean 0.2, sd 0.1, half-width t_{.975,2} * 0.1 / sqrt(3)
    assert (s.n, s.mean, s.sd, s.minimum, s.maximum) == pytest.approx((3, 0.2, 0.1, 0.1, 0.3))
    assert (s.low, s.high) == pytest.approx((0.2 - T975[2] * 0.1 / math.sqrt(3), 0.2 + T975[2] * 0.1 / math.sqrt(3)),
                                            abs=1e-4)
    one = statistics.summarize([0.4])
    assert one.mean == 0.4 and math.isnan(one.sd) and math.isnan(one.low)
    assert statistics.summarize([]).n == 0


def test_bootstrap_interval_hand_worked():
    # Two values 0 and 1: a resample's mean is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4, so the 2.5% and
    # 97.5% percentiles are the extremes.
    assert statistics.bootstrap_interval([0.0, 1.0], resamples=20000, seed=0) == (0.0, 1.0)
    # 0, 0, 3: a mean of 3 needs three draws of 3 (p = 1/27 = 3.7% > 2.5%), so the upper end is 3; the lower is 0.
    assert statistics.bootstrap_interval([0.0, 0.0, 3.0], resamples=20000, seed=0) == (0.0, 3.0)
    # 0, 0, 0, 0, 4: P(mean >= 1.6) = P(two or more 4s in 5 draws) = 1 - 0.8^5 - 5 * 0.2 * 0.8^4 = 26.3% and
    # P(mean >= 2.4) = 5.8%, P(mean >= 3.2) = 0.67%: the 97.5% percentile is 2.4; P(mean = 0) = 0.8^5 = 32.8%.
    assert statistics.bootstrap_interval([0, 0, 0, 0, 4], resamples=50000, seed=1) == pytest.approx((0.0, 2.4))
    assert statistics.bootstrap_interval([2.0, 2.0, 2.0]) == (2.0, 2.0)
    assert all(math.isnan(v) for v in statistics.bootstrap_interval([1.0]))


def test_bootstrap_is_reproducible_by_seed():
    values = [0.013, -0.042, 0.027, 0.101, -0.006]
    first = statistics.bootstrap_interval(values, resamples=2000, seed=7)
    assert statistics.bootstrap_interval(values, resamples=2000, seed=7) == first
    assert statistics.bootstrap_interval(values, resamples=2000, seed=8) != first
    assert min(values) <= first[0] < np.mean(values) < first[1] <= max(values)


# ------------------------------------------------------------------------------------------------ variants
def test_each_preset_changes_only_what_its_name_says():
    base = HDMLConfig(alpha=7.0, gen_lambda=0.3)  # the flags' values survive every preset but the λ ablations
    paper = parse_variant("hdml").config(base)
    assert paper == HDMLConfig(alpha=7.0, gen_lambda=0.3)

    def changed(name):
        cfg = parse_variant(name).config(base)
        return {k: v for k, v in vars(cfg).items() if vars(paper)[k] != v}
    assert changed("baseline") == {"hdml": False}
    assert changed("hdml_no_hardness") == {"pull": "none"}
    assert changed("hdml_fixed_hardness") == {"pull": "fixed"}
    assert changed("hdml_no_softmax") == {"gen_lambda": 0.0}
    assert changed("hdml_no_recon") == {"gen_lambda": 1.0}
    # The paper's switches are restored when the base configuration changed them.
    assert parse_variant("hdml").config(HDMLConfig(pull="none")).pull == "adaptive"


def test_variant_overrides_and_errors():
    v = parse_variant("hdml_fixed_hardness+fixed_pull=0.2+alpha=9")
    cfg = v.config(HDMLConfig())
    assert (cfg.pull, cfg.fixed_pull, cfg.alpha, v.name) == ("fixed", 0.2, 9.0,
                                                             "hdml_fixed_hardness+fixed_pull=0.2+alpha=9")
    assert parse_variant("hdml+skip_nonfinite=false").config(HDMLConfig()).skip_nonfinite is False
    with pytest.raises(ConfigError, match="unknown preset 'hdmll'; expected one of baseline, hdml"):
        parse_variant("hdmll")
    with pytest.raises(ConfigError, match="'alfa=9' is not FIELD=VALUE"):
        parse_variant("hdml+alfa=9")
    with pytest.raises(ConfigError, match="alpha='x'"):
        parse_variant("hdml+alpha=x")
    with pytest.raises(ConfigError, match="variant hdml_fixed_hardness\\+fixed_pull=2: fixed_pull=2.0 must lie"):
        parse_variant("hdml_fixed_hardness+fixed_pull=2").config(HDMLConfig())
    with pytest.raises(ConfigError, match="syn_gradient='half' is unknown; expected one of full, capped, none"):
        parse_variant("hdml+syn_gradient=half").config(HDMLConfig())
    with pytest.raises(ConfigError, match="variant hdml is listed twice"):
        parse_variants(["hdml", "baseline", "hdml"])
    assert set(PRESETS) == {"baseline", "hdml", "hdml_no_hardness", "hdml_fixed_hardness", "hdml_no_softmax",
                            "hdml_no_recon"}


# ------------------------------------------------------------------------------------------------ bookkeeping
METRICS = {"baseline": {0: 0.50, 1: 0.60, 2: 0.70}, "hdml": {0: 0.55, 1: 0.60, 2: 0.80}}


def _fake_trainer(calls, fail=None):
    """A stand-in for run_experiment: writes results.json and a history as a real run would, or raises."""
    from hdml_tf.rundir import RunDir

    def train(run, method, optim, printer=print):
        import dataclasses
        key = "hdml" if method.hdml else "baseline"
        calls.append((key, run.seed))
        if fail and (key, run.seed) in fail:
            raise fail[(key, run.seed)]
        out = RunDir(run.output_dir)
        value = METRICS[key][run.seed]
        out.write_history(key, {"j_m": [3.0, 2.0], "j_m_unweighted": [3.5, 2.5]} if method.hdml else
                          {"j_m": [3.0, 1.5]})
        out.write_results({"run": dataclasses.asdict(run), "method": dataclasses.asdict(method),
                           "optim": dataclasses.asdict(optim), "train_seconds": {key: 10.0 + run.seed},
                           "test": {"raw_pixels": {"recall@1": 0.1},
                                    key: {"recall@1": value, "nmi": value / 2}}})
        printer("trained")
        return {}
    return train


def _comparison(path, seeds=(0, 1, 2), steps=10):
    from hdml_tf.comparison import Comparison
    run = RunConfig(steps=steps, batch_size=8, verbose=0)
    return Comparison(path, parse_variants(["baseline", "hdml"]), seeds, run, HDMLConfig(embedding_size=8),
                      OptimConfig())


def test_finished_failed_and_pending_runs_are_reported_and_resumed(tmp_path):
    from hdml_tf.callbacks import TrainingDiverged
    from hdml_tf.comparison import format_report, runs_csv
    comparison = _comparison(tmp_path)
    calls, lines = [], []
    fail = {("hdml", 1): TrainingDiverged("20 consecutive steps with NaN/Inf (j_soft)"),
            ("baseline", 2): RuntimeError("out of memory\nmore detail")}
    comparison.train_all(_fake_trainer(calls, fail), printer=lines.append)
    assert calls == [("baseline", 0), ("hdml", 0), ("baseline", 1), ("hdml", 1), ("baseline", 2), ("hdml", 2)]
    status = {(r.variant, r.seed): r.status for r in comparison.records()}
    assert status == {("baseline", 0): "finished", ("hdml", 0): "finished", ("baseline", 1): "finished",
                      ("hdml", 1): "failed", ("baseline", 2): "failed", ("hdml", 2): "finished"}
    failed = json.loads((tmp_path / "hdml" / "seed_1" / "failed.json").read_text())
    assert failed["error"] == "diverged: 20 consecutive steps with NaN/Inf (j_soft)"
    assert "RuntimeError: out of memory" in json.loads((tmp_path / "baseline" / "seed_2" / "failed.json")
                                                       .read_text())["error"]
    assert any("FAILED (diverged" in line for line in lines)

    report = comparison.report(resamples=100)
    assert report["counts"] == {"finished": 4, "failed": 2, "pending": 0}
    assert report["variants"]["hdml"]["failed"] == {"1": "diverged: 20 consecutive steps with NaN/Inf (j_soft)"}
    # Only seed 0 has both variants finished: one pair, +0.05, and no interval from one difference.
    d = report["differences"]["hdml"]["recall@1"]
    assert (d["n"], d["better"]) == (1, 1) and d["mean"] == pytest.approx(0.05) and math.isnan(d["t_low"])
    assert report["variants"]["baseline"]["metrics"]["recall@1"]["mean"] == pytest.approx(0.55)  # seeds 0, 1
    text = format_report(report)
    assert "FAILED: hdml seed 1: diverged: 20 consecutive steps" in text
    assert "FAILED: baseline seed 2: RuntimeError: out of memory" in text
    assert "runs: 4 finished, 2 failed, 0 pending" in text
    rows = list(csv.DictReader(runs_csv(report).splitlines()))
    assert [(r["variant"], r["seed"], r["status"]) for r in rows][3] == ("hdml", "1", "failed")
    assert rows[1]["final_j_m_unweighted"] == "2.5" and rows[0]["final_j_m_unweighted"] == "1.5"

    # The same command again: nothing is trained (finished kept, failed kept as failed) ...
    calls.clear()
    comparison.train_all(_fake_trainer(calls), printer=lines.append)
    assert calls == []
    # ... unless asked to retry the failed runs; a run killed half-way (no results) is trained again too.
    (tmp_path / "hdml" / "seed_0" / "results.json").unlink()
    comparison.train_all(_fake_trainer(calls), retry_failed=True, printer=lines.append)
    assert calls == [("hdml", 0), ("hdml", 1), ("baseline", 2)]
    report = comparison.report(resamples=100)
    assert report["counts"] == {"finished": 6, "failed": 0, "pending": 0}
    d = report["differences"]["hdml"]["recall@1"]  # 0.05, 0.0, 0.1
    assert (d["n"], d["better"], d["ties"], d["worse"]) == (3, 2, 1, 0)
    assert d["mean"] == pytest.approx(0.05)
    assert (d["t_low"], d["t_high"]) == pytest.approx((0.05 - T975[2] * 0.05 / math.sqrt(3),
                                                       0.05 + T975[2] * 0.05 / math.sqrt(3)), abs=1e-4)


def test_a_run_of_another_configuration_is_not_mixed_in(tmp_path):
    calls = []
    _comparison(tmp_path, seeds=(0,)).train_all(_fake_trainer(calls), printer=lambda line: None)
    with pytest.raises(ConfigError, match="was made with steps=10, but this comparison asks for steps=20"):
        _comparison(tmp_path, seeds=(0,), steps=20).records()


def test_report_files(tmp_path):
    comparison = _comparison(tmp_path)
    comparison.train_all(_fake_trainer([]), printer=lambda line: None)
    written = comparison.write_report(comparison.report(resamples=100))
    assert json.loads(written["json"].read_text())["differences"]["hdml"]["nmi"]["n"] == 3
    assert written["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(written["csv"].read_text().splitlines()) == 1 + 6


# ------------------------------------------------------------------------------------------------ the tool
def _tool(*flags, timeout=600):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT)] + sys.path)}
    return subprocess.run([sys.executable, str(DRIVER), *flags], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)


TOY = ["--dataset=digits", "--image_size=32", "--batch_size=8", "--steps=4", "--steps_per_epoch=2",
       "--embedding_size=8", "--window=2", "--verbose=0", "--deterministic", "--variants=baseline,hdml",
       "--seeds=0,1", "--bootstrap_resamples=1000"]


def test_tool_end_to_end_and_rerun_reproduces(tmp_path):
    out = tmp_path / "cmp"
    first = _tool(*TOY, f"--output_dir={out}")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "mode: deterministic" in first.stdout and "runs: 4 finished, 0 failed, 0 pending" in first.stdout
    report = json.loads((out / "compare.json").read_text())
    assert report["deterministic"] is True and report["reference"] == "baseline"
    assert set(report["variants"]["hdml"]["metrics"]) >= {"nmi", "f1", "recall@1", "map@r", "r_precision"}
    hdml = report["variants"]["hdml"]["metrics"]["recall@1"]["per_seed"]
    base = report["variants"]["baseline"]["metrics"]["recall@1"]["per_seed"]
    assert report["differences"]["hdml"]["recall@1"]["per_seed"] == pytest.approx(
        {s: hdml[s] - base[s] for s in ("0", "1")})
    assert (out / "compare.png").stat().st_size > 1000
    assert len((out / "runs.csv").read_text().splitlines()) == 5
    steps = list(csv.DictReader((out / "hdml" / "seed_1" / "steps_hdml.csv").read_text().splitlines()))
    assert [int(r["step"]) for r in steps] == [1, 2, 3, 4] and "grad_syn_norm" in steps[0]
    assert not (out / "hdml" / "seed_1" / "checkpoints").exists()  # a finished run keeps its .keras, not these

    # Run again with one run removed: only that one is trained, and --deterministic gives the same numbers.
    kept = (out / "baseline" / "seed_0" / "results.json").stat().st_mtime_ns
    shutil.rmtree(out / "hdml" / "seed_1")  # (a run's results.json alone is rebuilt from its run.json record)
    second = _tool(*TOY, f"--output_dir={out}")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "compare: 3 of 4 runs already done" in second.stdout
    assert (out / "baseline" / "seed_0" / "results.json").stat().st_mtime_ns == kept
    again = json.loads((out / "compare.json").read_text())
    assert again["variants"]["hdml"]["metrics"] == report["variants"]["hdml"]["metrics"]


@pytest.mark.parametrize("flags, message", [
    (["--seed=3"], "error: --seed is set by each run of a comparison; use --seeds"),
    (["--variants=baseline,hdml_fast"], "error: variant 'hdml_fast': unknown preset 'hdml_fast'"),
    (["--seeds=0,x"], "error: --seeds=0,x must be a comma-separated list of integers"),
    (["--variants=baseline,hdml", "--reference=hdml_no_recon"], "error: reference='hdml_no_recon' is not among"),
])
def test_bad_input_is_one_line(flags, message, tmp_path):
    result = _tool(*flags, f"--output_dir={tmp_path}/out", timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr[-500:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
