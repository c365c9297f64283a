"""The results the paper reports (Zheng et al., CVPR 2019) as project data, and a side-by-side table.

The numbers live in `hdml_tf/resources/paper_results.csv` (installed with the package), whose `#` header says where
they come from. One row per data set x method; columns nmi, f1, r1, r2, r4, r8 in percent. CUB-200-2011 and Cars196
report Recall@1,2,4,8 in r1..r8; Stanford Online Products reports Recall@1,10,100, which the CSV stores in r1, r2, r4
(r8 empty). `paper_row` undoes that packing: it returns metric names as `hdml_tf.evaluation` writes them
(`nmi`, `f1`, `recall@K`).

    >>> paper_row("cars196", "npair", hdml=True)["recall@1"]
    79.1
    >>> paper_row("sop", "triplet", hdml=False)["recall@100"]
    85.7
"""
from __future__ import annotations

import csv
import functools
import io
import textwrap
from importlib import resources
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from hdml_tf.data import datasets
from hdml_tf.errors import ConfigError

RESOURCE = "resources/paper_results.csv"
#: The CSV's recall columns; which K each holds is the data set's `paper_recall_ks` (hdml_tf.data.datasets).
_RECALL_COLUMNS = ("r1", "r2", "r4", "r8")
LOSS_NAMES = {"npair": "N-pair", "triplet": "Triplet"}


def _read_resource() -> str:
    return resources.files("hdml_tf").joinpath(RESOURCE).read_text(encoding="utf-8")


@functools.lru_cache(maxsize=1)
def _table() -> Tuple[str, Dict[Tuple[str, str], Dict[str, float]]]:
    """(source text, {(dataset, method): {metric: percent}}) parsed from the packaged CSV."""
    text = _read_resource()
    source = "\n".join(line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#"))
    body = io.StringIO("\n".join(line for line in text.splitlines() if line.strip() and not line.startswith("#")))
    rows = {}
    for record in csv.DictReader(body):
        dataset, method = record["dataset"], record["method"]
        ks = datasets.get(dataset).paper_recall_ks
        metrics = {"nmi": float(record["nmi"]), "f1": float(record["f1"])}
        for k, column in zip(ks, _RECALL_COLUMNS):
            metrics[f"recall@{k}"] = float(record[column])
        rows[(dataset, method)] = metrics
    return source, rows


def paper_source() -> str:
    """Where the numbers come from (the CSV's `#` header, one paragraph)."""
    return " ".join(_table()[0].split())


def paper_table() -> Dict[Tuple[str, str], Dict[str, float]]:
    """Every reported row: {(dataset, method): {"nmi", "f1", "recall@K"...: percent}}; method is e.g. "hdml_npair"."""
    return {key: dict(value) for key, value in _table()[1].items()}


def method_name(loss: str, hdml: bool) -> str:
    """The CSV's method column: "npair", "hdml_npair", "triplet", "hdml_triplet"."""
    return f"hdml_{loss}" if hdml else loss


def has_paper_row(dataset: str, loss: str, hdml: bool = True) -> bool:
    return (dataset, method_name(loss, hdml)) in _table()[1]


def paper_row(dataset: str, loss: str, hdml: bool) -> Dict[str, float]:
    """The paper's NMI, F1 and Recall@K (percent) for one data set x loss x HDML on/off.

    Args:
      dataset: "cub200", "cars196" or "sop".
      loss: "npair" or "triplet" (the paper reports no contrastive rows).
      hdml: True for "<loss> + HDML", False for the plain baseline.
    Returns:
      {"nmi": ..., "f1": ..., "recall@1": ..., ...} in percent, with the data set's K (1,2,4,8 or 1,10,100).
    Raises:
      ConfigError: the paper reports no such row.
    """
    rows = _table()[1]
    key = (dataset, method_name(loss, hdml))
    if key not in rows:
        reported = sorted({d for d, _ in rows})
        losses = sorted({m.replace("hdml_", "") for _, m in rows})
        raise ConfigError(f"the paper reports no results for dataset={dataset} loss={loss} (it reports datasets "
                          f"{', '.join(reported)} with losses {', '.join(losses)})")
    return dict(rows[key])


def _variants(results: Mapping, hdml: bool) -> List[Tuple[bool, Mapping[str, float]]]:
    """[(hdml?, metrics as fractions)] of a run_experiment results dict or a flat metrics dict."""
    if "test" in results and isinstance(results["test"], Mapping):
        tested = results["test"]
        found = [(flag, tested[name]) for name, flag in (("baseline", False), ("hdml", True)) if name in tested]
        if not found:
            raise ConfigError("results hold no trained network (expected test.hdml or test.baseline)")
        return found
    return [(hdml, results)]


def _row_label(loss: str, hdml: bool) -> str:
    name = LOSS_NAMES.get(loss, loss)
    return f"{name} + HDML" if hdml else name


def side_by_side(results: Mapping, dataset: str, loss: str, hdml: bool, *, digits: int = 1) -> str:
    """A paper-style table: for each trained variant, the paper's row, ours and the difference, in percent.

    Args:
      results: what `hdml_tf.experiment.run_experiment` returns (or its results.json): every trained variant in
        `results["test"]` ("baseline", "hdml") gets its rows. Or the metrics of one network (`{"nmi": 0.61, ...}`,
        fractions as `hdml_tf.evaluation` returns them), which is the variant `hdml` names.
      dataset, loss: the run's data set and loss; without a paper row (e.g. glyphs) only our numbers are shown.
      hdml: which variant a flat metrics dict is.
    Returns:
      Multi-line text: a title, a header (NMI, F1, R@K with the paper's K), then per variant the lines
      `paper`, `ours` and `ours - paper` (percentage points), then the source of the paper's numbers.
    """
    variants = _variants(results, hdml)
    reported = any(has_paper_row(dataset, loss, flag) for flag, _ in variants)
    spec = datasets.find(dataset)
    if spec is not None and spec.paper_recall_ks:
        ks = spec.paper_recall_ks
    else:
        ks = sorted({int(k.split("@")[1]) for _, m in variants for k in m if k.startswith("recall@")})
    columns = ["nmi", "f1"] + [f"recall@{k}" for k in ks]
    heads = [c.upper().replace("RECALL@", "R@") for c in columns]
    label_width = max(len("ours - paper  ") + 2, max(len(_row_label(loss, f)) for f, _ in variants) + 8)
    fmt = f"{{:.{digits}f}}"

    def line(label: str, values: Sequence[Optional[float]], signed: bool = False) -> str:
        cells = []
        for v in values:
            if v is None:
                cells.append("-")
            else:
                v = round(v, digits) + 0.0  # no "-0.0"
                cells.append(("+" if signed and v >= 0 else "") + fmt.format(v))
        return label.ljust(label_width) + "".join(c.rjust(8) for c in cells)

    title = f"{spec.title if spec else dataset}, {LOSS_NAMES.get(loss, loss)} loss: ours beside the paper (%)"
    head = "".ljust(label_width) + "".join(h.rjust(8) for h in heads)
    out = [title, head, "-" * len(head)]
    for flag, metrics in variants:
        ours = [100.0 * float(metrics[c]) if c in metrics else None for c in columns]
        name = _row_label(loss, flag)
        if has_paper_row(dataset, loss, flag):
            paper = paper_row(dataset, loss, flag)
            theirs = [paper.get(c) for c in columns]
            out.append(line(f"paper  {name}", theirs))
            out.append(line(f"ours   {name}", ours))
            out.append(line("ours - paper", [None if a is None or b is None else a - b for a, b in zip(ours, theirs)],
                            signed=True))
        else:
            out.append(line(f"ours   {name}", ours))
    if reported:
        out.extend(textwrap.wrap(f"paper: Zheng et al., Hardness-Aware Deep Metric Learning, CVPR 2019. Source of "
                                 f"the numbers: {paper_source()}", width=max(len(head), 100)))
    else:
        out.append(f"the paper reports no {dataset} / {loss} results; only this run's numbers are shown")
    return "\n".join(out)
