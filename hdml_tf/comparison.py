"""A comparison of variants over seeds: each (variant, seed) trained once, the spread reported, reruns resume.

    <output_dir>/
      compare.json               settings, mode, per-variant mean ± sd, paired differences with intervals, every run
      runs.csv                   one row per (variant, seed): status, metrics, training time, final diagnostics, error
      compare.png                per-seed points, mean and 95% interval per variant; paired differences below
      <variant>/seed_<s>/        the run directory of one training (`hdml_tf.rundir.RunDir`: results.json, history,
                                 per-step diagnostics, weights), run.log (what the run printed), failed.json if failed

A run is *finished* when its results.json holds the variant's scores, *failed* when failed.json says why (it
diverged — `max_bad_steps` NaN/Inf steps in a row — or raised; its message and traceback are kept), and *pending*
otherwise (not started, or killed: its checkpoints under seed_<s>/checkpoints let the next attempt resume). The same
command run again trains only the pending runs (and the failed ones with `retry_failed`); a finished or failed run
whose stored configuration differs from the one asked for stops the comparison with one error line instead of
being mixed in silently.

Statistics: `hdml_tf.statistics` (paired by seed: same data order and initialization for every variant of a seed).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import shutil
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from hdml_tf import atomic, statistics
from hdml_tf.config import HDMLConfig, OptimConfig, RunConfig
from hdml_tf.errors import ConfigError, HDMLError
from hdml_tf.rundir import RunDir
from hdml_tf.variants import Variant

COMPARE_JSON = "compare.json"
RUNS_CSV = "runs.csv"
COMPARE_PNG = "compare.png"
FAILED_JSON = "failed.json"
RUN_LOG = "run.log"

#: RunConfig fields that may differ between a stored run and the comparison asking for it (where and how verbosely a
#: run writes, not what it computes).
_RUN_FIELDS_FREE = ("output_dir", "checkpoint_dir", "verbose", "keep_checkpoints", "checkpoint_every", "run_name",
                    "overwrite")
#: Last-epoch means copied from each run's history into runs.csv ("final_<key>"); J_m is taken before its weight
#: e^(−β/J_gen) so that HDML's and the baseline's are comparable.
FINAL_KEYS = ("j_m_unweighted", "j_syn", "syn_weight", "pull_factor", "grad_real_norm", "grad_syn_norm",
              "skipped_steps")
#: Metrics in the order tables show them.
_METRIC_ORDER = ("nmi", "f1", "recall@", "map@r", "r_precision")


def metric_label(key: str) -> str:
    """Short column label: NMI, F1, R@K, MAP@R, RP."""
    if key.startswith("recall@"):
        return "R@" + key.split("@", 1)[1]
    return {"nmi": "NMI", "f1": "F1", "map@r": "MAP@R", "r_precision": "RP"}.get(key, key)


def order_metrics(keys) -> List[str]:
    """Metric keys in table order (NMI, F1, R@K ascending, MAP@R, R-Precision, then anything else)."""
    def rank(k):
        for i, prefix in enumerate(_METRIC_ORDER):
            if k == prefix or (prefix.endswith("@") and k.startswith(prefix)):
                sub = int(k.split("@")[1]) if prefix == "recall@" else 0
                return (i, sub, k)
        return (len(_METRIC_ORDER), 0, k)
    return sorted(keys, key=rank)


@dataclasses.dataclass
class RunRecord:
    """One (variant, seed) of a comparison as found on disk.

    Attributes:
      status: "finished", "failed" or "pending".
      metrics: {metric: value in [0, 1]} of the trained network on the test classes (finished runs).
      train_seconds: wall-clock training time (finished runs).
      final: last-epoch means of FINAL_KEYS found in the history.
      error: why a failed run failed (one line).
    """

    variant: str
    seed: int
    status: str
    path: str
    metrics: Dict[str, float] = dataclasses.field(default_factory=dict)
    train_seconds: Optional[float] = None
    final: Dict[str, float] = dataclasses.field(default_factory=dict)
    error: Optional[str] = None


def _jsonable(value):
    return json.loads(json.dumps(value, default=atomic._json_default))


class Comparison:
    """Variants × seeds trained under one base configuration, in `output_dir`.

    Args:
      output_dir: where every run and the report go.
      variants: `hdml_tf.variants.Variant`s; the first named `reference` is what the others are paired against.
      seeds: the seeds; each variant is trained once per seed.
      run, method, optim: the base configuration (the flags); each run gets `run` with its seed and directory and
        `variant.config(method)`.
      reference: the name of the reference variant (default: "baseline" if present, else the first).
    """

    def __init__(self, output_dir, variants: Sequence[Variant], seeds: Sequence[int], run: RunConfig,
                 method: HDMLConfig, optim: OptimConfig, reference: Optional[str] = None):
        self.path = Path(output_dir)
        self.variants = list(variants)
        self.seeds = [int(s) for s in seeds]
        if not self.variants:
            raise ConfigError("a comparison needs at least one variant")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds={self.seeds}: expected at least one seed, each once")
        names = [v.name for v in self.variants]
        if reference is None:
            reference = "baseline" if "baseline" in names else names[0]
        if reference not in names:
            raise ConfigError(f"reference={reference!r} is not among the variants ({', '.join(names)})")
        self.reference = reference
        self.run, self.method, self.optim = run, method, optim
        self.methods = {v.name: v.config(method) for v in self.variants}  # validates every variant up front
        for v in self.variants:
            self.methods[v.name].layout().check_batch_size(run.batch_size)

    # ---------------------------------------------------------------------------------------- one run
    def run_dir(self, variant: str, seed: int) -> Path:
        return self.path / variant / f"seed_{seed}"

    def run_config(self, variant: str, seed: int) -> RunConfig:
        """The RunConfig of one run: the base with its seed, directory and resumable checkpoints."""
        where = self.run_dir(variant, seed)
        return dataclasses.replace(self.run, seed=seed, output_dir=str(where),
                                   checkpoint_dir=str(where / "checkpoints"))

    @staticmethod
    def result_key(method: HDMLConfig) -> str:
        """The row name `run_experiment` gives the trained network in results.json ("hdml" or "baseline")."""
        return "hdml" if method.hdml else "baseline"

    def _expected(self, variant: str, seed: int) -> Dict:
        return {"run": _jsonable(dataclasses.asdict(self.run_config(variant, seed))),
                "method": _jsonable(dataclasses.asdict(self.methods[variant])),
                "optim": _jsonable(dataclasses.asdict(self.optim))}

    def _check_same_config(self, variant: str, seed: int, stored: Dict, source: Path) -> None:
        """ConfigError when a stored run was made with another configuration than this comparison asks for."""
        expected = self._expected(variant, seed)
        defaults = {"run": _jsonable(dataclasses.asdict(RunConfig())),
                    "method": _jsonable(dataclasses.asdict(HDMLConfig())),
                    "optim": _jsonable(dataclasses.asdict(OptimConfig()))}
        for section, fields in expected.items():
            have = stored.get(section, {})
            for name, want in fields.items():
                if section == "run" and name in _RUN_FIELDS_FREE:
                    continue
                # A field added to the configuration after the run was made: equal if the run used its default.
                got = have.get(name, defaults[section].get(name)) if name not in have else have[name]
                if got != want:
                    raise ConfigError(
                        f"{source} was made with {name}={got!r}, but this comparison asks for {name}={want!r}; use "
                        f"another --output_dir, or remove {source.parent} to train it again")

    def record(self, variant: str, seed: int) -> RunRecord:
        """What is on disk for one run (checked against this comparison's configuration)."""
        where = self.run_dir(variant, seed)
        rundir = RunDir(where)
        key = self.result_key(self.methods[variant])
        failed = where / FAILED_JSON
        if rundir.results.exists():
            results = rundir.read_results()
            if key in results.get("test", {}):
                self._check_same_config(variant, seed, results, rundir.results)
                metrics = {k: float(v) for k, v in results["test"][key].items()}
                bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
                record = RunRecord(variant, seed, "finished", str(where), metrics,
                                   results.get("train_seconds", {}).get(key), _final_values(rundir.history(key)))
                if bad:
                    record.status, record.error = "failed", f"non-finite test metrics ({', '.join(bad)})"
                return record
        if failed.exists():
            data = json.loads(failed.read_text())
            self._check_same_config(variant, seed, data, failed)
            return RunRecord(variant, seed, "failed", str(where), error=data.get("error", "failed"),
                             final=_final_values(rundir.history(key)))
        return RunRecord(variant, seed, "pending", str(where))

    def records(self) -> List[RunRecord]:
        """Every run, seed-major (all variants of seed 0 first), as on disk now."""
        return [self.record(v.name, s) for s in self.seeds for v in self.variants]

    def train_one(self, variant: str, seed: int, train: Callable, printer: Callable[[str], None]) -> RunRecord:
        """Trains one run with `train(run, method, optim, printer=...)` (`run_experiment`); a divergence or an
        unexpected exception is written to failed.json and returned as a failed record. User errors
        (HDMLError other than a divergence) and interruptions propagate: they are not properties of the run."""
        from hdml_tf.callbacks import TrainingDiverged, TrainingInterrupted
        import keras
        where = self.run_dir(variant, seed)
        where.mkdir(parents=True, exist_ok=True)
        (where / FAILED_JSON).unlink(missing_ok=True)
        keras.backend.clear_session()  # each run starts from a fresh Keras state (names, graphs, memory)
        log_path = where / RUN_LOG

        def log(line: str) -> None:
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        error = None
        try:
            train(self.run_config(variant, seed), self.methods[variant], self.optim, printer=log)
        except TrainingInterrupted:
            raise
        except TrainingDiverged as e:
            error = (f"diverged: {e}", "")
        except HDMLError:
            raise
        except Exception as e:  # noqa: BLE001 - an unexpected failure of one run is reported, the others go on
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            error = (f"{type(e).__name__}: {first}"[:500], traceback.format_exc())
        if error is not None:
            atomic.write_json(where / FAILED_JSON, {"error": error[0], "traceback": error[1],
                                                    **self._expected(variant, seed)})
            log(f"failed: {error[0]}")
        record = self.record(variant, seed)
        if record.status == "finished":
            shutil.rmtree(where / "checkpoints", ignore_errors=True)  # the run's .keras keeps its final state
        return record

    # ---------------------------------------------------------------------------------------- all runs
    def train_all(self, train: Optional[Callable] = None, retry_failed: bool = False,
                  printer: Callable[[str], None] = print, after_each: Optional[Callable[[], None]] = None) -> None:
        """Trains every pending run (and failed ones with `retry_failed`), seed-major, printing one line per run
        with its result and the estimated time left; `after_each()` runs after every run (to refresh the report)."""
        if train is None:
            from hdml_tf.experiment import run_experiment as train
        todo = [r for r in self.records() if r.status == "pending" or (retry_failed and r.status == "failed")]
        total = len(self.variants) * len(self.seeds)
        printer(f"compare: {total - len(todo)} of {total} runs already done in {self.path}; {len(todo)} to train")
        durations = []
        for i, pending in enumerate(todo):
            start = time.time()
            printer(f"[{i + 1}/{len(todo)}] {pending.variant} seed {pending.seed}: training "
                    f"({self.run.steps} steps) -> {pending.path}")
            record = self.train_one(pending.variant, pending.seed, train, printer)
            durations.append(time.time() - start)
            left = (len(todo) - i - 1) * sum(durations) / len(durations)
            if record.status == "finished":
                main = next((k for k in ("recall@1", "nmi") if k in record.metrics), None)
                outcome = f"finished, {metric_label(main)} {100 * record.metrics[main]:.1f}" if main else "finished"
            else:
                outcome = f"FAILED ({record.error})"
            printer(f"[{i + 1}/{len(todo)}] {pending.variant} seed {pending.seed}: {outcome} in "
                    f"{durations[-1] / 60:.1f} min; about {left / 60:.0f} min left")
            if after_each is not None:
                after_each()

    # ---------------------------------------------------------------------------------------- report
    def mode(self) -> str:
        """Which mode produced the numbers: deterministic (op determinism, seeded) or not."""
        if self.run.deterministic:
            return ("deterministic (--deterministic: TensorFlow op determinism; a seed gives the same numbers on "
                    "the same machine and software)")
        return ("nondeterministic (TensorFlow's default kernels: two runs of one seed can differ; see the "
                "README on determinism)")

    def report(self, resamples: int = 10000, bootstrap_seed: int = 0, confidence: float = 0.95) -> Dict:
        """The whole comparison as a JSON-able dict (what compare.json holds)."""
        records = self.records()
        metrics = order_metrics({k for r in records if r.status == "finished" for k in r.metrics})
        by_variant: Dict[str, Dict] = {}
        for v in self.variants:
            mine = [r for r in records if r.variant == v.name]
            finished = [r for r in mine if r.status == "finished"]
            by_variant[v.name] = {
                "preset": v.preset.name, "description": v.describe(), "changes": _jsonable(v.changes()),
                "method": _jsonable(dataclasses.asdict(self.methods[v.name])),
                "finished": [r.seed for r in finished],
                "failed": {str(r.seed): r.error for r in mine if r.status == "failed"},
                "pending": [r.seed for r in mine if r.status == "pending"],
                "train_seconds": statistics.summarize([r.train_seconds for r in finished
                                                       if r.train_seconds is not None]).to_dict(),
                "metrics": {m: {**statistics.summarize([r.metrics[m] for r in finished if m in r.metrics],
                                                       confidence).to_dict(),
                                "per_seed": {str(r.seed): r.metrics[m] for r in finished if m in r.metrics}}
                            for m in metrics}}
        differences: Dict[str, Dict] = {}
        reference = {r.seed: r for r in records if r.variant == self.reference and r.status == "finished"}
        for v in self.variants:
            if v.name == self.reference:
                continue
            mine = {r.seed: r for r in records if r.variant == v.name and r.status == "finished"}
            differences[v.name] = {}
            for m in metrics:
                diff = statistics.paired_difference(
                    {s: r.metrics[m] for s, r in mine.items() if m in r.metrics},
                    {s: r.metrics[m] for s, r in reference.items() if m in r.metrics},
                    confidence, resamples, bootstrap_seed)
                differences[v.name][m] = None if diff is None else diff.to_dict()
        return {
            "output_dir": str(self.path), "mode": self.mode(), "deterministic": bool(self.run.deterministic),
            "reference": self.reference, "seeds": self.seeds, "metrics": metrics, "confidence": confidence,
            "intervals": statistics.INTERVAL_NOTE.format(resamples=resamples, seed=bootstrap_seed),
            "counts": {s: sum(r.status == s for r in records) for s in ("finished", "failed", "pending")},
            "variants": by_variant, "differences": differences,
            "config": {"run": _jsonable(dataclasses.asdict(self.run)),
                       "method": _jsonable(dataclasses.asdict(self.method)),
                       "optim": _jsonable(dataclasses.asdict(self.optim))},
            "runs": [_jsonable(dataclasses.asdict(r)) for r in records]}

    def write_report(self, report: Dict, plot_metrics: Sequence[str] = ("recall@1", "nmi", "map@r", "f1"),
                     directory=None) -> Dict:
        """compare.json, runs.csv and compare.png (atomic) into `directory` (default: the comparison's own, where
        the runs are; another one lets several comparisons share runs, e.g. the ablations and the main comparison's
        baseline and hdml runs); returns {kind: path}."""
        where = Path(directory) if directory else self.path
        where.mkdir(parents=True, exist_ok=True)
        written = {"json": atomic.write_json(where / COMPARE_JSON, report),
                   "csv": atomic.write_text(where / RUNS_CSV, runs_csv(report))}
        try:
            written["png"] = plot_comparison(report, where / COMPARE_PNG, plot_metrics)
        except ImportError:  # pragma: no cover - matplotlib is a dependency, but plots stay optional
            pass
        return written


def _final_values(history_path: Path) -> Dict[str, float]:
    """Last-epoch means of FINAL_KEYS from a history CSV (j_m stands in for j_m_unweighted in a baseline)."""
    if not history_path.exists():
        return {}
    with open(history_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    last = rows[-1]
    if "j_m_unweighted" not in last and "j_m" in last:
        last = {**last, "j_m_unweighted": last["j_m"]}
    found = {}
    for key in FINAL_KEYS:
        if last.get(key) not in (None, ""):
            found[key] = float(last[key])
    return found


# ------------------------------------------------------------------------------------------------ outputs
def runs_csv(report: Dict) -> str:
    """One row per run: variant, seed, status, every metric, training seconds, final diagnostics, error, path."""
    metrics = report["metrics"]
    finals = sorted({k for r in report["runs"] for k in r.get("final", {})},
                    key=lambda k: FINAL_KEYS.index(k) if k in FINAL_KEYS else len(FINAL_KEYS))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["variant", "seed", "status"] + metrics + ["train_seconds"] + [f"final_{k}" for k in finals]
                    + ["error", "path"])
    for r in report["runs"]:
        writer.writerow([r["variant"], r["seed"], r["status"]] + [_cell(r["metrics"].get(m)) for m in metrics]
                        + [_cell(r.get("train_seconds"))] + [_cell(r.get("final", {}).get(k)) for k in finals]
                        + [r.get("error") or "", r["path"]])
    return buffer.getvalue()


def _cell(value) -> str:
    return "" if value is None else repr(float(value))


def _pct(value: float, signed: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"


def format_report(report: Dict, metrics: Optional[Sequence[str]] = None) -> str:
    """The console table: per metric, each variant's n, mean ± sd and the paired difference against the reference
    with its 95% t interval, bootstrap interval and win count; then the failed runs. Values in percent."""
    metrics = [m for m in (metrics or report["metrics"]) if m in report["metrics"]]
    ref = report["reference"]
    lines = [f"mode: {report['mode']}", f"intervals: {report['intervals']}",
             f"reference: {ref}; values in percent on the unseen test classes; difference = variant - {ref} on "
             f"the same seed", ""]
    width = max([len(v) for v in report["variants"]] + [7])
    header = (f"{'metric':<7} {'variant':<{width}} {'n':>2} {'mean ± sd':>13} {'diff':>6} "
              f"{'95% t interval':>16} {'bootstrap':>16} {'better':>9}")
    lines.append(header)
    for m in metrics:
        lines.append("-" * len(header))
        for name, data in report["variants"].items():
            s = data["metrics"].get(m, {})
            n = s.get("n", 0)
            cell = f"{_pct(s.get('mean'))} ± {_pct(s.get('sd'))}" if n else "-"
            row = f"{metric_label(m):<7} {name:<{width}} {n:>2} {cell:>13}"
            d = report["differences"].get(name, {}).get(m)
            if d:
                row += (f" {_pct(d['mean'], True):>6} {'[' + _pct(d['t_low'], True) + ', ' + _pct(d['t_high'], True) + ']':>16}"
                        f" {'[' + _pct(d['boot_low'], True) + ', ' + _pct(d['boot_high'], True) + ']':>16}"
                        f" {str(d['better']) + ' of ' + str(d['n']):>9}")
            lines.append(row)
    failed = [(name, seed, why) for name, data in report["variants"].items() for seed, why in data["failed"].items()]
    pending = [(name, data["pending"]) for name, data in report["variants"].items() if data["pending"]]
    lines.append("")
    for name, seed, why in failed:
        lines.append(f"FAILED: {name} seed {seed}: {why}")
    for name, seeds in pending:
        lines.append(f"not run yet: {name} seeds {', '.join(map(str, seeds))} (run the same command to continue)")
    c = report["counts"]
    lines.append(f"runs: {c['finished']} finished, {c['failed']} failed, {c['pending']} pending")
    return "\n".join(lines)


def plot_comparison(report: Dict, path, metrics: Sequence[str] = ("recall@1", "nmi", "map@r", "f1")) -> Path:
    """compare.png: for each metric, a column of two panels. Top: every seed's value per variant (points; a grey
    line joins the variants of one seed), the mean (black bar) and its 95% t interval. Bottom: the paired
    differences against the reference per variant, with the 95% t interval of their mean and a line at 0.

    Returns:
      the PNG's path (written atomically).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    metrics = [m for m in metrics if m in report["metrics"]] or list(report["metrics"][:4])
    names = list(report["variants"])
    others = [n for n in names if n != report["reference"]]
    seeds = [str(s) for s in report["seeds"]]
    colors = plt.get_cmap("tab10")
    fig, axes = plt.subplots(2, max(1, len(metrics)), figsize=(3.4 * max(1, len(metrics)) + 0.6, 7.2),
                             squeeze=False)
    for col, m in enumerate(metrics):
        top, bottom = axes[0][col], axes[1][col]
        for k, seed in enumerate(seeds):
            xs = [i for i, n in enumerate(names) if seed in report["variants"][n]["metrics"][m]["per_seed"]]
            ys = [100 * report["variants"][names[i]]["metrics"][m]["per_seed"][seed] for i in xs]
            top.plot(xs, ys, color="0.8", linewidth=0.8, zorder=1)
            top.scatter(np.array(xs) + 0.06 * (k - (len(seeds) - 1) / 2), ys, s=18, color=colors(k % 10),
                        zorder=2, label=f"seed {seed}" if col == 0 else None)
        for i, n in enumerate(names):
            s = report["variants"][n]["metrics"][m]
            if s["n"]:
                top.plot([i - 0.25, i + 0.25], [100 * s["mean"]] * 2, color="black", linewidth=2, zorder=3)
            if s["n"] >= 2:
                top.errorbar(i + 0.3, 100 * s["mean"], yerr=[[100 * (s["mean"] - s["low"])],
                                                            [100 * (s["high"] - s["mean"])]],
                             color="black", capsize=3, linewidth=1, zorder=3)
            for seed in report["variants"][n]["failed"]:
                top.annotate("failed", (i, top.get_ylim()[0]), fontsize=7, color="red", ha="center",
                             va="bottom")
        top.set_xticks(range(len(names)))
        top.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        top.set_title(f"{metric_label(m)} (%)", fontsize=10)
        top.grid(axis="y", alpha=0.3)
        bottom.axhline(0.0, color="0.5", linewidth=0.8)
        for i, n in enumerate(others):
            d = report["differences"][n].get(m)
            if not d:
                continue
            for k, seed in enumerate(seeds):
                if seed in d["per_seed"]:
                    bottom.scatter(i + 0.06 * (k - (len(seeds) - 1) / 2), 100 * d["per_seed"][seed], s=18,
                                   color=colors(k % 10), zorder=2)
            if d["n"] >= 2:
                bottom.errorbar(i + 0.3, 100 * d["mean"], yerr=[[100 * (d["mean"] - d["t_low"])],
                                                               [100 * (d["t_high"] - d["mean"])]],
                                fmt="o", color="black", capsize=3, markersize=4, zorder=3)
        bottom.set_xticks(range(len(others)))
        bottom.set_xticklabels(others, rotation=30, ha="right", fontsize=8)
        bottom.set_xlim(-0.6, max(len(others), 1) - 0.4)
        bottom.set_title(f"{metric_label(m)}: minus {report['reference']} (points: seeds; bar: 95% t)", fontsize=9)
        bottom.grid(axis="y", alpha=0.3)
    if seeds:
        axes[0][0].legend(fontsize=7, loc="best")
    mode = "deterministic" if report.get("deterministic") else "nondeterministic"
    c = report["counts"]
    fig.suptitle(f"{Path(report['output_dir']).name}: {len(seeds)} seeds, {mode}; {c['finished']} runs finished, "
                 f"{c['failed']} failed, {c['pending']} pending", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    with atomic.atomic_path(path) as temp:
        fig.savefig(temp, dpi=110, format="png")
    plt.close(fig)
    return path
