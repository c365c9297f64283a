"""Fetch, verify and unpack CUB-200-2011, Cars196 and Stanford Online Products into the layout the readers read.

`download_dataset("cub200", "/data")` leaves `/data/CUB_200_2011/...` exactly as `read_dataset("cub200", "/data")`
(and `--dataset=cub200 --data_dir=/data`) expects it, in these steps:

1. An existing complete copy (the reader's own count check passes) is left alone; nothing is fetched. A partial
   copy is reported and completed from the archive (unpacking writes every file again).
2. Each archive of the data set (`SOURCES`) comes from `--archive` files the user passes, from an archive verified
   by an earlier run (`DIR/downloads/NAME`), or from its URLs, tried in order. A download is streamed to a
   temporary name (`DIR/downloads/NAME.part-<url hash>`, one per URL because mirrors may serve other bytes) and
   resumed with an HTTP Range request after an interruption: within the run (`retries`), or by running the same
   command again. A source that cannot be reached, answers with an error status, sends a web page instead of the
   archive (a login or "confirm download" page) or announces another size is skipped with a warning, and the
   next one is tried.
3. Every archive is checked against its published size and checksums (md5 and/or SHA-256, with where each value
   is published) before anything is unpacked. A mismatch is one error line; the file stays under its temporary
   name and nothing is unpacked.
4. The archives' member lists are checked against the layout (`ArchiveFile.required`) and for unsafe paths
   (absolute, `..`, links, devices) before any file is written; then they are unpacked into DIR, each file
   written to a temporary name and renamed, so an interrupted unpack never leaves a truncated image under its
   real name.
5. The reader runs once more; its CountReport (`cub200: complete: 5,864 of 5,864 training images ...`) is the
   result. Downloaded archives are deleted once the copy is complete (`keep_archives=False`); files the user
   passed are never deleted.

Only the standard library talks HTTP (urllib; proxies from the usual `https_proxy` / `http_proxy` variables).
The checksums are facts published by the data sets' distributors and by other projects that ship download code
(cited next to each value); no code of theirs is used.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import http.client
import json
import logging
import os
import shutil
import socket
import stat
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath
from typing import Dict, Iterable, List, Optional, Sequence, TextIO, Tuple

from hdml_tf.errors import ConfigError
from hdml_tf.data import readers
from hdml_tf.errors import DataError
from hdml_tf.progress import ByteProgress, format_bytes

log = logging.getLogger(__name__)

DOWNLOADS = "downloads"  # sub-folder of data_dir for archives (partial and verified)
FORMATS = ("tgz", "zip", "file")  # gzip'ed tar, zip, or a plain file copied as it is
ALGORITHMS = {"md5": 32, "sha256": 64}  # hex digits of each digest
ROLES = ("official", "mirror")
USER_AGENT = "Mozilla/5.0 (compatible; hdml_tf-download/0.1)"
_CHUNK = 1 << 20


# --------------------------------------------------------------------------------------------- the table


@dataclasses.dataclass(frozen=True)
class Digest:
    """A published checksum of an archive.

    Attributes:
      algorithm: "md5" or "sha256".
      value: lowercase hex digest.
      source: where the value is published (a project and file, or a page).
    """

    algorithm: str
    value: str
    source: str


@dataclasses.dataclass(frozen=True)
class Variant:
    """One byte-exact version of an archive: a file is this version when its size and every digest match.

    Attributes:
      size: bytes (None when no source publishes it).
      digests: at least one Digest.
      note: what this version is ("the original archive", a re-host, ...).
    """

    size: Optional[int]
    digests: Tuple[Digest, ...]
    note: str = ""


@dataclasses.dataclass(frozen=True)
class Source:
    """A URL an archive can be fetched from.

    Attributes:
      url: http(s) (resumable), ftp or file (fetched whole).
      role: "official" (the data set's distributor) or "mirror" (a copy others host).
      note: its state and provenance, e.g. "gone since 2023", "fastai's copy".
      variant: index into `ArchiveFile.variants` of the bytes this URL serves.
    """

    url: str
    role: str
    note: str = ""
    variant: int = 0


@dataclasses.dataclass(frozen=True)
class ArchiveFile:
    """One file a data set is distributed as.

    Attributes:
      name: file name, e.g. "CUB_200_2011.tgz" (also the name under DIR/downloads and, for format "file", in DIR).
      format: "tgz", "zip" or "file".
      variants: known versions; variants[0] is the original.
      sources: URLs, tried in this order.
      required: member paths that must be in the archive for the reader's layout; a path ending with "/" needs at
        least one file below it. For format "file": the first bytes the file must start with (its magic), as text.
    """

    name: str
    format: str
    variants: Tuple[Variant, ...]
    sources: Tuple[Source, ...]
    required: Tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class DatasetSource:
    """Where a data set comes from.

    Attributes:
      dataset: reader name ("cub200", "cars196", "sop").
      homepage: the distributor's page.
      files: the archives; all are needed.
      hint: what to do when no source can be reached (part of that error line).
    """

    dataset: str
    homepage: str
    files: Tuple[ArchiveFile, ...]
    hint: str = ""


_PML = ("pytorch-metric-learning's benchmark suite (github KevinMusgrave/powerful-benchmarker, "
        "src/powerful_benchmarker/datasets/{})")
_TFDS = "TensorFlow Datasets (github tensorflow/datasets, tensorflow_datasets/{})"

SOURCES: Dict[str, DatasetSource] = {
    "cub200": DatasetSource(
        dataset="cub200",
        homepage="https://www.vision.caltech.edu/datasets/cub_200_2011/",
        files=(ArchiveFile(
            name="CUB_200_2011.tgz", format="tgz",
            variants=(Variant(
                size=1_150_585_339,
                digests=(
                    Digest("sha256", "0c685df5597a8b24909f6a7c9db6d11e008733779a671760afef78feb49bf081",
                           _TFDS.format("url_checksums/caltech_birds2011.txt") + " with size 1150585339; the same "
                           "value in FluxML/FastAI.jl src/datasets/fastaidatasets.jl for fastai's copy"),
                    Digest("md5", "97eceeb196236b17998738112f37df78", _PML.format("cub200.py"))),
                note="the original archive (11,788 images, 200 classes)"),),
            sources=(
                Source("https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz?download=1", "official",
                       "CaltechDATA record 65de6-vp158, which replaced the www.vision.caltech.edu/visipedia-data "
                       "link (pytorch-metric-learning's CUB dataset downloads it)"),
                Source("https://s3.amazonaws.com/fast-ai-imageclas/CUB_200_2011.tgz", "mirror",
                       "fastai's copy (fastai/fastai fastai/data/checks.txt lists the same size; FastAI.jl the same "
                       "SHA-256)"),
                Source("https://drive.usercontent.google.com/download?id=1hbzc_P1FuxMkcabkgn9ZKinBwW683j45"
                       "&export=download&confirm=t", "mirror",
                       "the Google Drive copy TensorFlow Datasets' caltech_birds2011 downloads (its checksum file "
                       "gives the SHA-256 above)")),
            required=("CUB_200_2011/images.txt", "CUB_200_2011/image_class_labels.txt", "CUB_200_2011/classes.txt",
                      "CUB_200_2011/images/")),),
        hint="download CUB_200_2011.tgz from https://data.caltech.edu/records/65de6-vp158 and pass --archive=FILE"),
    "cars196": DatasetSource(
        dataset="cars196",
        homepage="https://ai.stanford.edu/~jkrause/cars/car_dataset.html",
        files=(
            ArchiveFile(
                name="car_ims.tgz", format="tgz",
                variants=(Variant(size=None, digests=(
                    Digest("md5", "d5c8f0aa497503f355e17dc7886c3f14", _PML.format("cars196.py")),),
                    note="the original archive of all 16,185 images"),),
                sources=(Source("http://ai.stanford.edu/~jkrause/car196/car_ims.tgz", "official",
                                "gone since 2023 (pytorch/vision#7545, tensorflow/datasets#4932); tried in case it "
                                "returns; earlier it was http://imagenet.stanford.edu/internal/car196/"),),
                required=("car_ims/",)),
            ArchiveFile(
                name="cars_annos.mat", format="file",
                variants=(Variant(size=None, digests=(
                    Digest("md5", "b407c6086d669747186bd1d764ff9dbc", _PML.format("cars196.py")),),
                    note="the original annotations of car_ims.tgz"),),
                sources=(Source("http://ai.stanford.edu/~jkrause/car196/cars_annos.mat", "official",
                                "gone since 2023, with car_ims.tgz"),),
                required=("MATLAB",))),
        hint=("Stanford's server is gone and no copy with a published checksum of the original pair is known: get "
              "car_ims.tgz and cars_annos.mat (the original files, checked against their md5) elsewhere and pass "
              "--archive=car_ims.tgz --archive=cars_annos.mat")),
    "sop": DatasetSource(
        dataset="sop",
        homepage="https://cvgl.stanford.edu/projects/lifted_struct/",
        files=(ArchiveFile(
            name="Stanford_Online_Products.zip", format="zip",
            variants=(Variant(
                size=3_083_860_082,
                digests=(
                    Digest("sha256", "b04fa78210e69fab050ce73939550e1cd0f96890bdd98ec9fee732c3b756ef48",
                           _TFDS.format("datasets/stanford_online_products/checksums.tsv") + " with size 3083860082"),
                    Digest("md5", "7f73d41a2f44250d4779881525aea32e", _PML.format("stanford_online_products.py"))),
                note="the original archive (120,053 images, 22,634 classes)"),),
            sources=(
                Source("http://ftp.cs.stanford.edu/cs/cvgl/Stanford_Online_Products.zip", "official",
                       "the authors' FTP server, over HTTP (resumable)"),
                Source("https://drive.usercontent.google.com/download?id=1TclrpQOF_ullUP99wk_gjGN8pKvtErG8"
                       "&export=download&confirm=t", "official",
                       "the authors' Google Drive copy (README of github rksltnl/Deep-Metric-Learning-CVPR16; "
                       "pytorch-metric-learning downloads it)"),
                Source("ftp://cs.stanford.edu/cs/cvgl/Stanford_Online_Products.zip", "official",
                       "the authors' FTP link as published (FTP: fetched whole, not resumable)")),
            required=("Stanford_Online_Products/Ebay_train.txt", "Stanford_Online_Products/Ebay_test.txt")),),
        hint="download Stanford_Online_Products.zip from https://cvgl.stanford.edu/projects/lifted_struct/ and pass "
             "--archive=FILE"),
}


# ----------------------------------------------------------------------------------- the table as JSON


def sources_to_json(sources: Dict[str, DatasetSource]) -> str:
    """The table as JSON (the format `sources_from_json` and the tool's --sources read)."""
    return json.dumps({name: dataclasses.asdict(src) for name, src in sources.items()}, indent=1)


def sources_from_json(text: str, origin: str = "sources") -> Dict[str, DatasetSource]:
    """Parses and checks a table written like `sources_to_json`'s output.

    Args:
      text: the JSON text.
      origin: where it came from, for error messages (a file name).

    Raises:
      ConfigError: not JSON, a missing or wrongly typed field, an unknown format/algorithm/role, a bad digest,
        a variant index out of range. The message names the field, e.g. "sources.json: cub200.files[0].name".
    """
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{origin} is not JSON ({e.msg} at line {e.lineno}); expected a table like "
                          f"hdml_tf.data.download.sources_to_json writes") from None

    def need(obj, key, kind, where):
        if not isinstance(obj, dict) or key not in obj:
            raise ConfigError(f"{origin}: {where} has no field {key!r}")
        value = obj[key]
        if kind is int and value is None:
            return None
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"{origin}: {where}.{key} is {value!r}; expected a {getattr(kind, '__name__', kind)}")
        return value

    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: expected an object mapping data set names to their sources")
    table = {}
    for name, src in raw.items():
        files = []
        for i, f in enumerate(need(src, "files", list, name)):
            where = f"{name}.files[{i}]"
            variants = []
            for j, v in enumerate(need(f, "variants", list, where)):
                vw = f"{where}.variants[{j}]"
                digests = []
                for k, d in enumerate(need(v, "digests", list, vw)):
                    dw = f"{vw}.digests[{k}]"
                    algorithm = need(d, "algorithm", str, dw)
                    value = need(d, "value", str, dw).lower()
                    if algorithm not in ALGORITHMS:
                        raise ConfigError(f"{origin}: {dw}.algorithm is {algorithm!r}; expected one of "
                                          f"{', '.join(ALGORITHMS)}")
                    if len(value) != ALGORITHMS[algorithm] or any(c not in "0123456789abcdef" for c in value):
                        raise ConfigError(f"{origin}: {dw}.value {value!r} is not {ALGORITHMS[algorithm]} hex digits")
                    digests.append(Digest(algorithm, value, need(d, "source", str, dw)))
                if not digests:
                    raise ConfigError(f"{origin}: {vw} has no digests; a file cannot be verified without one")
                variants.append(Variant(need(v, "size", int, vw), tuple(digests), v.get("note", "")))
            sources = []
            for j, s in enumerate(need(f, "sources", list, where)):
                sw = f"{where}.sources[{j}]"
                role, index = need(s, "role", str, sw), need(s, "variant", int, sw)
                if role not in ROLES:
                    raise ConfigError(f"{origin}: {sw}.role is {role!r}; expected one of {', '.join(ROLES)}")
                if index is None or not 0 <= index < len(variants):
                    raise ConfigError(f"{origin}: {sw}.variant is {index}; expected 0..{len(variants) - 1}")
                sources.append(Source(need(s, "url", str, sw), role, s.get("note", ""), index))
            fmt = need(f, "format", str, where)
            if fmt not in FORMATS:
                raise ConfigError(f"{origin}: {where}.format is {fmt!r}; expected one of {', '.join(FORMATS)}")
            if not variants:
                raise ConfigError(f"{origin}: {where} has no variants")
            files.append(ArchiveFile(need(f, "name", str, where), fmt, tuple(variants), tuple(sources),
                                     tuple(need(f, "required", list, where))))
        table[name] = DatasetSource(name, src.get("homepage", ""), tuple(files), src.get("hint", ""))
    return table


# ------------------------------------------------------------------------------------------ the result


@dataclasses.dataclass(frozen=True)
class DownloadResult:
    """What `download_dataset` did.

    Attributes:
      dataset, data_dir: as given.
      report: the reader's CountReport after the last step (`report.summary()` is the line to show).
      already_complete: True when a complete copy was found and nothing was fetched or unpacked.
      steps: one line per action ("downloaded ...", "verified ...", "unpacked ..."), for the user.
    """

    dataset: str
    data_dir: str
    report: readers.CountReport
    already_complete: bool
    steps: Tuple[str, ...] = ()


class DownloadInterrupted(DataError):
    """The transfer stopped part way; the partial file is kept and the same call resumes it."""


class ChecksumMismatch(DataError):
    """A complete file does not match its published size or checksum; it is kept but never unpacked."""


class _Unavailable(Exception):
    """A source that cannot serve the file (unreachable, error status, a web page, another size): try the next."""


# ------------------------------------------------------------------------------------------- checksums


def file_digests(path, algorithms: Iterable[str] = ("md5", "sha256"), progress: bool = False,
                 stream: Optional[TextIO] = None, label: str = "") -> Dict[str, str]:
    """Hex digests of a file in one read; e.g. {"md5": "...", "sha256": "..."}."""
    hashers = {a: hashlib.new(a) for a in algorithms}
    size = os.path.getsize(path)
    bar = ByteProgress(label or f"checking {os.path.basename(path)}", size, stream=stream,
                       enabled=progress and size > 8 * _CHUNK)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            for h in hashers.values():
                h.update(block)
            bar.update(len(block))
    bar.close()
    return {a: h.hexdigest() for a, h in hashers.items()}


def _mismatch(variant: Variant, size: int, digests: Dict[str, str]) -> Optional[str]:
    """None when the file is this variant, else what differs (one clause)."""
    if variant.size is not None and size != variant.size:
        return f"it has {size:,} bytes, expected {variant.size:,}"
    for d in variant.digests:
        if digests[d.algorithm] != d.value:
            return f"{d.algorithm} {digests[d.algorithm]}, expected {d.value} (published in {d.source})"
    return None


def _algorithms(variants: Iterable[Variant]) -> Tuple[str, ...]:
    return tuple(sorted({d.algorithm for v in variants for d in v.digests}))


# --------------------------------------------------------------------------------------------- fetching


def _partial_path(downloads: Path, file: ArchiveFile, url: str) -> Path:
    # One partial file per URL: mirrors may serve other bytes, so a resume must continue from the same URL.
    return downloads / f"{file.name}.part-{hashlib.sha256(url.encode()).hexdigest()[:8]}"


def _content_range(value: Optional[str]) -> Tuple[Optional[int], Optional[int]]:
    """`bytes START-END/TOTAL` -> (START, TOTAL); TOTAL None when "*"; (None, None) when absent or malformed."""
    try:
        unit, rest = value.split(" ", 1)
        span, total = rest.split("/", 1)
        if unit.strip() != "bytes":
            return None, None
        return int(span.split("-", 1)[0]), (None if total.strip() == "*" else int(total))
    except (AttributeError, ValueError):
        return None, None


def _describe(error: BaseException) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return f"{error.reason}"
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _open(opener, url: str, offset: int, timeout: float):
    """Opens url asking for bytes offset.. (HTTP only); returns (response, start offset of its body, full size)."""
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    http_like = urllib.parse.urlsplit(url).scheme in ("http", "https")
    if offset and http_like:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = opener.open(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and offset:
            return None, offset, None  # nothing left to send: the partial file may be whole already
        raise
    status = getattr(response, "status", None)
    length = response.headers.get("Content-Length")
    length = int(length) if length and length.isdigit() else None
    if status == 206:
        start, total = _content_range(response.headers.get("Content-Range"))
        if start != offset:  # a server that answers another range than asked: start over
            response.close()
            raise _Unavailable(f"answered a range request for byte {offset:,} with "
                               f"{response.headers.get('Content-Range')!r}")
        return response, offset, total
    return response, 0, length  # a whole file (HTTP 200, FTP, file:): the body starts at byte 0


def _transient(error: BaseException) -> bool:
    """True for failures worth a retry (reset, timeout, 5xx); False for a host that is not there (DNS, refused)."""
    if isinstance(error, urllib.error.HTTPError):
        return error.code >= 500
    reason = getattr(error, "reason", error)
    return not isinstance(reason, (socket.gaierror, ConnectionRefusedError))


def _fetch(file: ArchiveFile, source: Source, downloads: Path, *, retries: int, retry_wait: float, timeout: float,
           opener, progress: bool, stream: Optional[TextIO], label: str, steps: List[str]) -> Path:
    """Downloads one source into its partial file, resuming; returns the partial path once all bytes are there.

    Raises:
      _Unavailable: the source cannot serve this file (the caller tries the next one): an HTTP 4xx, an unknown
        host, a refused connection, a web page instead of the file, another size, or transient failures on every
        attempt before any byte arrived.
      DownloadInterrupted: bytes arrived but the transfer broke on every attempt; the partial file is kept.
    """
    variant = file.variants[source.variant]
    partial = _partial_path(downloads, file, source.url)
    received = 0  # bytes received from this source in this call
    for attempt in range(retries + 1):
        if attempt:
            log.warning("%s: %s; retry %d of %d in %.0f s", source.url, failure, attempt, retries,
                        retry_wait * attempt)
            time.sleep(retry_wait * attempt)
        offset = partial.stat().st_size if partial.exists() else 0
        if variant.size is not None and offset > variant.size:
            log.warning("%s holds %s, more than the %s of %s; starting it again", partial, format_bytes(offset),
                        format_bytes(variant.size), file.name)
            partial.unlink()
            offset = 0
        if variant.size is not None and offset == variant.size:
            return partial  # complete from an earlier run: verify it, do not ask the server again
        _check_space(downloads, (variant.size - offset) if variant.size else 0, f"downloading {file.name}")
        try:
            response, start, full = _open(opener, source.url, offset, timeout)
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            if not _transient(e):
                raise _Unavailable(_describe(e)) from None
            failure = _describe(e)
            continue
        if response is None:
            return partial  # HTTP 416 to a resume: the server has no bytes beyond those we hold
        with response:
            kind = (response.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if kind == "text/html" and not file.name.endswith((".html", ".htm")):
                raise _Unavailable("sent a web page (text/html) instead of the file: the host may want a login or a "
                                   "click to confirm")
            if variant.size is not None and full is not None and full != variant.size:
                raise _Unavailable(f"serves {full:,} bytes, expected {variant.size:,}")
            if offset and start == 0:
                steps.append(f"{source.url} does not resume; {file.name} starts again from byte 0")
                log.warning(steps[-1])
            elif start:
                steps.append(f"resumed {file.name} at byte {start:,} from {source.url}")
                log.info(steps[-1])
            expected = full if full is not None else variant.size
            bar = ByteProgress(label, expected, done=start, stream=stream, enabled=progress)
            got, failure = start, None
            try:
                # read1 returns what has arrived (up to 1 MiB), so a slow or broken connection still leaves
                # every received byte in the partial file.
                read = getattr(response, "read1", None) or response.read
                with open(partial, "r+b" if start else "wb") as out:
                    out.seek(start)
                    out.truncate()
                    for block in iter(lambda: read(_CHUNK), b""):
                        out.write(block)
                        got += len(block)
                        bar.update(len(block))
                    out.flush()
                    os.fsync(out.fileno())
            except (http.client.HTTPException, OSError) as e:
                if getattr(e, "errno", None) == errno.ENOSPC:  # retrying cannot help
                    raise DataError(f"writing {partial} failed ({e.strerror}); free some space and run the same "
                                    f"command again to resume") from None
                failure = _describe(e)
            finally:
                bar.close()
            received += got - start
            if failure is None and (expected is None or got >= expected):
                return partial  # a longer file than expected is left to the checksum to reject
            failure = failure or f"the connection closed after {got:,} of {expected:,} bytes"
    if not received:
        raise _Unavailable(f"{failure}, {retries + 1} time(s)")
    have = partial.stat().st_size if partial.exists() else 0
    size = f" of {variant.size:,}" if variant.size else ""
    raise DownloadInterrupted(
        f"downloading {file.name} from {source.url} stopped at {have:,}{size} bytes ({failure}); the partial file "
        f"{partial} is kept: run the same command again to resume")


def _check_space(folder: Path, needed: int, what: str) -> None:
    """DataError before a long job when the disk of `folder` has less than `needed` bytes free."""
    if needed <= 0:
        return
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise DataError(f"{what} needs {format_bytes(needed)} in {folder}, but only {format_bytes(free)} are free; "
                        f"free some space or choose another --data_dir")


# -------------------------------------------------------------------------------------------- unpacking


def _member_name(name: str, archive: Path) -> str:
    """Normalized relative POSIX path of an archive member; DataError for absolute paths and `..`."""
    path = PurePosixPath(name.replace("\\", "/"))
    parts = [p for p in path.parts if p not in ("", ".")]
    if path.is_absolute() or ".." in parts or (parts and ":" in parts[0]):
        raise DataError(f"{archive} holds the unsafe path {name!r} (absolute or with '..'); refusing to unpack it")
    return "/".join(parts)


def _entries(file: ArchiveFile, path: Path):
    """Yields (raw name, size in bytes, kind, open) per member in archive order; kind is "file", "dir" or "other"
    (links, devices), open() returns a readable stream of a file member."""
    if file.format == "tgz":
        with tarfile.open(path, "r:gz") as tar:
            for m in tar:  # sequential: one pass over the gzip stream
                kind = "file" if m.isfile() else "dir" if m.isdir() else "other"
                yield m.name, m.size, kind, (lambda m=m: tar.extractfile(m))
    else:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                kind = "other" if stat.S_ISLNK(info.external_attr >> 16) else "dir" if info.is_dir() else "file"
                yield info.filename, info.file_size, kind, (lambda info=info: z.open(info))


def _archive_error(file: ArchiveFile, path: Path, error: BaseException) -> DataError:
    kind = {"tgz": "gzip'ed tar archive", "zip": "zip archive"}[file.format]
    return DataError(f"{path} cannot be read as a {kind} ({_describe(error)}); expected {file.name} as its "
                     f"distributor publishes it")


_ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError)


def _list_members(file: ArchiveFile, path: Path) -> List[Tuple[str, int, bool]]:
    """(normalized name, size, is_dir) of every member ([] for a plain file); DataError for links, devices and
    unreadable archives."""
    members = []
    if file.format == "file":
        return members
    try:
        for raw, size, kind, _ in _entries(file, path):
            if kind == "other":
                raise DataError(f"{path} holds {raw!r}, a link or special file; refusing to unpack it")
            name = _member_name(raw, path)
            if name:
                members.append((name, size, kind == "dir"))
    except _ARCHIVE_ERRORS as e:
        raise _archive_error(file, path, e) from None
    return members


def _check_layout(file: ArchiveFile, path: Path, members: Sequence[Tuple[str, int, bool]], layout: str) -> None:
    """DataError naming the first required member the archive lacks (and what it holds at the top instead)."""
    if file.format == "file":
        with open(path, "rb") as f:
            head = f.read(128)
        for magic in file.required:
            if not head.startswith(magic.encode()):
                raise DataError(f"{path} does not start with {magic!r}; expected {file.name} in its published format")
        return
    names = {name for name, _, is_dir in members if not is_dir}
    for need in file.required:
        found = any(n.startswith(need) for n in names) if need.endswith("/") else need in names
        if not found:
            top = sorted({n.split("/")[0] + ("/" if "/" in n or is_dir else "") for n, _, is_dir in members})
            shown = ", ".join(top[:6]) + (", ..." if len(top) > 6 else "")
            raise DataError(f"{path} does not hold {need}{'...' if need.endswith('/') else ''} (its top level: "
                            f"{shown or 'nothing'}); expected the official archive, which unpacks to {layout}")


def _write_atomic(target: Path, reader) -> None:
    """Copies a readable stream to target through a temporary name in the same folder, then renames it."""
    tmp = target.with_name(f".{target.name}.unpacking")
    try:
        with open(tmp, "wb") as out:
            shutil.copyfileobj(reader, out, _CHUNK)
        os.replace(tmp, target)
    except BaseException:  # a full disk, Ctrl-C: leave neither a truncated file nor the temporary one
        tmp.unlink(missing_ok=True)
        raise


def _unpack(file: ArchiveFile, path: Path, members: Sequence[Tuple[str, int, bool]], data_dir: Path,
            progress: bool, stream: Optional[TextIO], label: str) -> int:
    """Unpacks (or, for format "file", copies) into data_dir; returns the number of files written."""
    if file.format == "file":
        with open(path, "rb") as f:
            _write_atomic(data_dir / file.name, f)
        return 1
    total = sum(size for _, size, is_dir in members if not is_dir)
    # Files already there (a partial copy being completed) are replaced, so their space comes back.
    present = sum(os.path.getsize(data_dir / n) for n, _, is_dir in members
                  if not is_dir and os.path.isfile(data_dir / n))
    _check_space(data_dir, total - present, f"unpacking {file.name}")
    log.info("unpacking %s (%s in %s files) into %s", file.name, format_bytes(total),
             f"{sum(not d for _, _, d in members):,}", data_dir)
    bar = ByteProgress(label, total, stream=stream, enabled=progress)
    written, current, folders = 0, None, set()
    try:
        for raw, size, kind, open_member in _entries(file, path):
            current = _member_name(raw, path)
            if not current:
                continue
            target = data_dir / current
            folder = target if kind == "dir" else target.parent
            if folder not in folders:  # one mkdir per folder, not per file (SOP has 120,053 files)
                folder.mkdir(parents=True, exist_ok=True)
                folders.add(folder)
            if kind == "dir":
                continue
            with open_member() as member:
                _write_atomic(target, member)
            written += 1
            bar.update(size)
    except _ARCHIVE_ERRORS as e:
        again = ("free some space and run the same command again" if getattr(e, "errno", None) == errno.ENOSPC
                 else "run the same command again")
        raise DataError(f"unpacking {path} into {data_dir} failed at {current!r} ({_describe(e)}); the files "
                        f"unpacked so far are whole: {again}") from None
    finally:
        bar.close()
    return written


# ------------------------------------------------------------------------------------------------ steps


class _Lock:
    """An exclusive lock on DIR/downloads/.lock for the duration of a call (POSIX flock; none elsewhere)."""

    def __init__(self, downloads: Path):
        self.path = downloads / ".lock"
        self.handle = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # Windows: no advisory lock; two runs into one folder are the user's care there
            return self
        self.handle = open(self.path, "w")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.handle.close()
            raise DataError(f"another download into {self.path.parent.parent} is running (it holds {self.path}); "
                            f"wait for it to finish") from None
        return self

    def __exit__(self, *exc):
        if self.handle is not None:
            self.handle.close()  # closing releases the flock


def _existing(dataset: str, data_dir: Path) -> Optional[readers.CountReport]:
    """The reader's report on what is in data_dir, or None when it finds no usable copy at all."""
    try:
        return readers.read_dataset(dataset, data_dir).report
    except DataError:
        return None


def _match_archive(src: DatasetSource, path: Path, progress: bool,
                   stream: Optional[TextIO]) -> Tuple[ArchiveFile, Variant]:
    """Which file (and version) of the data set a user's archive is, by size and checksums."""
    if not path.is_file():
        raise DataError(f"archive {path} not found; expected {' or '.join(f.name for f in src.files)} of "
                        f"{src.dataset}")
    size = path.stat().st_size
    digests = file_digests(path, _algorithms(v for f in src.files for v in f.variants), progress, stream,
                           f"checking {path.name}")
    for f in src.files:
        for v in f.variants:
            if _mismatch(v, size, digests) is None:
                return f, v
    known = "; ".join(f"{f.name}: " + ", ".join(f"{d.algorithm} {d.value}" for v in f.variants for d in v.digests)
                      for f in src.files)
    raise ChecksumMismatch(f"archive {path} ({size:,} bytes, sha256 {digests.get('sha256', '?')}, md5 "
                           f"{digests.get('md5', '?')}) is none of the published archives of {src.dataset} ({known}); "
                           f"expected an unmodified download")


def _verify_download(file: ArchiveFile, variant: Variant, path: Path, url: str, progress: bool,
                     stream: Optional[TextIO]) -> None:
    digests = file_digests(path, _algorithms([variant]), progress, stream, f"checking {file.name}")
    problem = _mismatch(variant, path.stat().st_size, digests)
    if problem:
        # Without a published size a transfer cut short looks complete; the kept file then resumes on the next run.
        what_next = ("delete it to download it again, or pass the official archive with --archive" if variant.size
                     else "if the transfer was cut short the same command resumes it; else delete it")
        raise ChecksumMismatch(f"{file.name} from {url} does not match its published checksum: {problem}; it is kept "
                               f"at {path} and nothing was unpacked ({what_next})")


def _obtain(src: DatasetSource, file: ArchiveFile, downloads: Path, *, retries, retry_wait, timeout, opener,
            progress, stream, steps) -> Path:
    """A verified copy of `file` under downloads/, from an earlier run or from its sources in order."""
    final = downloads / file.name
    if final.exists():
        digests = file_digests(final, _algorithms(file.variants), progress, stream, f"checking {file.name}")
        if any(_mismatch(v, final.stat().st_size, digests) is None for v in file.variants):
            steps.append(f"verified {final} (downloaded before)")
            return final
        raise ChecksumMismatch(f"{final} does not match any published checksum of {file.name} (damaged on disk?); "
                               f"delete it to download it again")
    # A URL with a partial file goes first, so an interrupted download resumes where it stopped.
    order = sorted(file.sources, key=lambda s: not _partial_path(downloads, file, s.url).exists())
    unavailable = []
    for source in order:
        label = f"{src.dataset} {file.name}"
        log.info("fetching %s from %s (%s)", file.name, source.url, source.role)
        try:
            partial = _fetch(file, source, downloads, retries=retries, retry_wait=retry_wait, timeout=timeout,
                             opener=opener, progress=progress, stream=stream, label=label, steps=steps)
        except _Unavailable as e:
            unavailable.append(f"{source.url} ({e})")
            log.warning("%s cannot serve %s: %s; trying the next source", source.url, file.name, e)
            continue
        _verify_download(file, file.variants[source.variant], partial, source.url, progress, stream)
        os.replace(partial, final)
        for other in file.sources:  # partial files from other URLs are now useless
            _partial_path(downloads, file, other.url).unlink(missing_ok=True)
        steps.append(f"downloaded {file.name} from {source.url} ({source.role}) and verified it")
        return final
    raise DataError(f"{src.dataset}: no source of {file.name} could be used: {'; '.join(unavailable)}"
                    + (f"; {src.hint}" if src.hint else ""))


def download_dataset(dataset: str, data_dir, *, archives: Sequence = (),
                     sources: Optional[Dict[str, DatasetSource]] = None, keep_archives: bool = False,
                     retries: int = 3, retry_wait: float = 2.0, timeout: float = 60.0, progress: bool = True,
                     stream: Optional[TextIO] = None, opener=None) -> DownloadResult:
    """Makes data_dir hold a complete copy of `dataset` in the layout its reader reads (see the module doc).

    Args:
      dataset: "cub200", "cars196" or "sop".
      data_dir: the folder `--data_dir` will name; created when missing.
      archives: files the user fetched (any of the data set's archives, recognised by their checksums); the
        others are downloaded.
      sources: the table to use (default SOURCES).
      keep_archives: keep downloaded archives under data_dir/downloads after a complete unpack.
      retries: resumes of a broken transfer within this call (then DownloadInterrupted; calling again resumes).
      retry_wait: seconds before the first retry (times the retry number after).
      timeout: seconds without data before a connection counts as broken.
      progress: draw progress lines on `stream` (default stderr).
      opener: a urllib opener (default urllib.request.build_opener(): redirects and environment proxies).

    Returns:
      DownloadResult whose `report` is the reader's CountReport of the copy now in data_dir.

    Raises:
      ConfigError: unknown data set.
      DataError: a source problem (one line naming the file, the URL and what to do): no usable source,
        DownloadInterrupted (resume by calling again), ChecksumMismatch (nothing unpacked), a wrong archive layout
        or unsafe member, too little disk space, data_dir not writable, another download into data_dir running.
    """
    table = dict(SOURCES if sources is None else sources)
    if dataset not in table:
        raise ConfigError(f"dataset={dataset!r} cannot be downloaded; expected one of {', '.join(sorted(table))}")
    src = table[dataset]
    from hdml_tf.data import datasets
    spec = datasets.find(dataset)
    layout = spec.layout if spec is not None else ""
    root = Path(data_dir).expanduser()
    downloads = root / DOWNLOADS
    try:
        downloads.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create {downloads} ({e.strerror}); expected a writable --data_dir") from None
    opener = opener or urllib.request.build_opener()

    with _Lock(downloads):
        try:
            return _run(src, root, downloads, layout, archives, keep_archives=keep_archives, retries=retries,
                        retry_wait=retry_wait, timeout=timeout, opener=opener, progress=progress, stream=stream)
        finally:
            # The lock file, and the downloads folder when nothing is left in it (partial files are kept).
            (downloads / ".lock").unlink(missing_ok=True)
            try:
                downloads.rmdir()
            except OSError:
                pass


def _run(src: DatasetSource, root: Path, downloads: Path, layout: str, archives: Sequence, *, keep_archives,
         retries, retry_wait, timeout, opener, progress, stream) -> DownloadResult:
    """The steps of `download_dataset`, under its lock."""
    dataset = src.dataset
    steps: List[str] = []
    before = _existing(dataset, root)
    if before is not None and not before.partial:
        log.info("%s: complete copy found in %s; nothing to do", dataset, root)
        return DownloadResult(dataset, str(root), before, True, (f"found a complete copy in {root}",))
    if before is not None:
        steps.append(f"found a partial copy ({before.summary()}); completing it from the archive")
        log.info(steps[-1])  # the reader has already warned about the partial copy

    # 1. every archive, verified, before anything is unpacked
    given: Dict[str, Path] = {}
    for path in archives:
        path = Path(path).expanduser()
        file, variant = _match_archive(src, path, progress, stream)
        if file.name in given:
            raise DataError(f"--archive {path} and {given[file.name]} are both {file.name}; pass it once")
        given[file.name] = path
        steps.append(f"verified {path} as {file.name} ({variant.note or 'published checksum'})")
    paths = {}
    for file in src.files:
        paths[file.name] = given.get(file.name) or _obtain(
            src, file, downloads, retries=retries, retry_wait=retry_wait, timeout=timeout, opener=opener,
            progress=progress, stream=stream, steps=steps)

    # 2. every layout, before anything is unpacked
    listed = {}
    for file in src.files:
        listed[file.name] = _list_members(file, paths[file.name])
        _check_layout(file, paths[file.name], listed[file.name], layout)

    # 3. unpack, then the reader's own count check
    for file in src.files:
        n = _unpack(file, paths[file.name], listed[file.name], root, progress, stream,
                    f"{dataset} unpacking {file.name}")
        steps.append(f"unpacked {file.name} into {root} ({n:,} files)")
        log.info(steps[-1])
    report = readers.read_dataset(dataset, root).report
    if not report.partial and not keep_archives:
        downloaded = [file.name for file in src.files if file.name not in given]
        for name in downloaded:
            (downloads / name).unlink(missing_ok=True)
        if downloaded:
            steps.append(f"deleted the downloaded {', '.join(downloaded)} (the copy is complete)")
    return DownloadResult(dataset, str(root), report, False, tuple(steps))
