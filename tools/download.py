#!/usr/bin/env python
"""Fetch, verify and unpack a photo data set into the layout `--dataset=NAME --data_dir=DIR` reads.

    python tools/download.py cub200 --data_dir=/data
    python tools/download.py sop --data_dir=/data --archive=~/Downloads/Stanford_Online_Products.zip
    python tools/download.py cars196 --data_dir=/data/cars196 --archive=car_ims.tgz --archive=cars_annos.mat
    python tools/download.py sop --show_sources             # where each archive comes from, with its checksums

The archive is streamed into DIR/downloads under a temporary name with a progress line (bytes, rate, time left)
and resumed after an interruption (run the same command again); its size and published checksum are verified
before anything is unpacked; the unpacked copy is checked with the reader's own counts, whose summary is printed.
A complete copy already in DIR is left alone. Sources, their checksums and where each checksum is published live
in `hdml_tf.data.download.SOURCES`; `--sources=FILE.json` replaces entries of that table (a private mirror).
Errors print as one line `error: ...` on stderr with exit code 2.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags

from hdml_tf.errors import HDMLError

DATASETS = ("cub200", "cars196", "sop")


def define_flags():
    """Flags of this tool; defined only when run as a program, so importing it has no side effects."""
    flags.DEFINE_string("data_dir", None, "Folder to unpack into (created when missing); then train with "
                        "--dataset=NAME --data_dir=DIR.")
    flags.DEFINE_multi_string("archive", [], "An archive you fetched yourself (repeat for several); recognised by "
                              "its checksum; the data set's other archives are downloaded.")
    flags.DEFINE_string("sources", None, "JSON file replacing entries of the built-in table of sources (same form "
                        "as --show_sources --json prints).")
    flags.DEFINE_bool("keep_archive", False, "Keep downloaded archives in DIR/downloads after a complete unpack.")
    flags.DEFINE_integer("retries", 3, "Resumes of a broken transfer before giving up (the same command resumes).")
    flags.DEFINE_float("timeout", 60.0, "Seconds without data before a connection counts as broken.")
    flags.DEFINE_bool("progress", True, "Progress lines on stderr.")
    flags.DEFINE_bool("show_sources", False, "Print the data set's archives, URLs and checksums, and exit.")
    flags.DEFINE_bool("json", False, "With --show_sources: print the table as JSON (the --sources format).")


def load_sources(path: str | None) -> dict:
    """The built-in table, with the data sets of `path` (JSON) replacing theirs."""
    from hdml_tf.data.download import SOURCES, sources_from_json
    table = dict(SOURCES)
    if path:
        if not os.path.isfile(path):
            raise HDMLError(f"--sources file {path} not found; expected a JSON table of sources")
        with open(path, encoding="utf-8") as f:
            table.update(sources_from_json(f.read(), origin=path))
    return table


def describe_sources(source) -> list:
    """Readable lines: each archive, its versions with checksums and their origin, its URLs."""
    lines = [f"{source.dataset}: {source.homepage}"]
    for file in source.files:
        lines.append(f"  {file.name} ({file.format})")
        for i, v in enumerate(file.variants):
            size = f"{v.size:,} bytes" if v.size is not None else "size not published"
            lines.append(f"    version {i}: {v.note or 'archive'}, {size}")
            lines += [f"      {d.algorithm} {d.value}  (from {d.source})" for d in v.digests]
        for s in file.sources:
            lines.append(f"    {s.role:8s} {s.url}" + (f"  [version {s.variant}]" if len(file.variants) > 1 else ""))
            if s.note:
                lines.append(f"             {s.note}")
    return lines


def main(argv):
    f = flags.FLAGS
    if len(argv) != 2 or argv[1] not in DATASETS:
        got = " ".join(argv[1:]) or "nothing"
        raise HDMLError(f"expected one data set name ({', '.join(DATASETS)}) before the flags, got {got}: "
                        f"python tools/download.py cub200 --data_dir=DIR")
    dataset = argv[1]
    table = load_sources(f.sources)
    if f.show_sources:
        if f.json:
            from hdml_tf.data.download import sources_to_json
            print(sources_to_json({dataset: table[dataset]}))
        else:
            print("\n".join(describe_sources(table[dataset])))
        return 0
    if not f.data_dir:
        raise HDMLError("--data_dir is required (the folder to unpack into, later passed to --data_dir)")
    if f.retries < 0 or f.timeout <= 0:
        raise HDMLError(f"--retries={f.retries} must be >= 0 and --timeout={f.timeout} > 0")

    from hdml_tf.data.download import download_dataset
    try:
        result = download_dataset(dataset, f.data_dir, archives=f.archive, sources=table,
                                  keep_archives=f.keep_archive, retries=f.retries, timeout=f.timeout,
                                  progress=f.progress)
    except KeyboardInterrupt:
        # Ctrl-C: what was downloaded stays in DIR/downloads (and unpacked files are whole), so say how to go on.
        print(f"\ninterrupted: partial downloads stay in {os.path.join(f.data_dir, 'downloads')}; run the same "
              f"command again to resume", file=sys.stderr)
        sys.exit(130)
    if result.already_complete:
        print(f"nothing to do, a complete copy is already there: {result.report.summary()}")
    else:
        print("\n".join(result.steps))
        if result.report.partial:
            raise HDMLError(f"unpacked, but the reader finds a partial copy: {result.report.summary()}; the archives "
                            f"were verified, so files went missing while unpacking (disk full?) or were removed: run "
                            f"the same command again")
        print(result.report.summary())
    print(f"train with: --dataset={dataset} --data_dir={result.data_dir}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import common_flags
    define_flags()
    app.run(common_flags.run_main(main), flags_parser=common_flags.parse_flags)
