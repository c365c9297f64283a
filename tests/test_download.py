"""tools/download.py and hdml_tf.data.download against a local HTTP server; no real URL is ever contacted.

The server (127.0.0.1, ephemeral port, one thread, at most 60 requests per test) serves archives the tests build
in each data set's real format and member names: CUB_200_2011.tgz (CUB_200_2011/images.txt, ...), car_ims.tgz plus
cars_annos.mat written by scipy.io.savemat with the real struct fields, Stanford_Online_Products.zip with the real
Ebay_*.txt header. It honours HTTP Range requests, logs every request with its Range header, and can misbehave per
request (drop the connection after N bytes, ignore Range, answer 404, send a web page, close without answering).
The built-in table's file names, formats and layout requirements are used as they are; only the URLs and the
checksums (computed here from the test's archives) are swapped in.
"""
import dataclasses
import hashlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT
from hdml_tf.config import ConfigError
from hdml_tf.data import download, readers
from hdml_tf.errors import DataError
from hdml_tf.progress import ByteProgress, format_bytes, format_duration

MAX_REQUESTS = 60


# ------------------------------------------------------------------------------------ archives in real format


def _jpeg(seed: int) -> bytes:
    from PIL import Image
    image = Image.fromarray(np.full((4, 4, 3), seed % 256, np.uint8))
    out = io.BytesIO()
    image.save(out, "JPEG")
    return out.getvalue()


def tgz(members: dict) -> bytes:
    """A gzip'ed tar with the given {path: bytes}; folders get their own entries as `tar czf` writes them."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        folders = sorted({"/".join(p.split("/")[:i]) for p in members for i in range(1, p.count("/") + 1)})
        for folder in folders:
            info = tarfile.TarInfo(folder)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for path, data in members.items():
            info = tarfile.TarInfo(path)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def cub_members(per_class: dict) -> dict:
    """CUB_200_2011/{images.txt, image_class_labels.txt, classes.txt, train_test_split.txt, images/...}."""
    jpeg = _jpeg(1)
    members, images, labels, classes, split = {"attributes.txt": b"1 has_bill_shape::curved\n"}, [], [], [], []
    image_id = 0
    for cls in sorted(per_class):
        folder = f"{cls:03d}.Bird_{cls}"
        classes.append(f"{cls} {folder}")
        for k in range(per_class[cls]):
            image_id += 1
            rel = f"{folder}/Bird_{cls}_{k:04d}_{image_id}.jpg"
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {cls}")
            split.append(f"{image_id} {k % 2}")
            members[f"CUB_200_2011/images/{rel}"] = jpeg
    for name, lines in (("images.txt", images), ("image_class_labels.txt", labels), ("classes.txt", classes),
                        ("train_test_split.txt", split)):
        members[f"CUB_200_2011/{name}"] = ("\n".join(lines) + "\n").encode()
    return members


def cars_annos(per_class: dict) -> bytes:
    """cars_annos.mat as the official file: struct array `annotations` (relative_im_path, bbox_*, class, test)."""
    from scipy.io import savemat
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    rows, n = [], 0
    for cls in sorted(per_class):
        for _ in range(per_class[cls]):
            n += 1
            rows.append((f"car_ims/{n:06d}.jpg", 10, 20, 110, 90, cls, n % 2))
    annotations = np.zeros((1, len(rows)), dtype=[(f, "O") for f in fields])
    for i, row in enumerate(rows):
        for f, value in zip(fields, row):
            annotations[0, i][f] = np.array([value]) if f == "relative_im_path" else np.array([[value]])
    names = np.empty((1, 196), dtype=object)
    for c in range(196):
        names[0, c] = f"Make Model {c + 1}"
    out = io.BytesIO()
    savemat(out, {"annotations": annotations, "class_names": names})
    return out.getvalue()


def cars_files(per_class: dict) -> dict:
    n = sum(per_class.values())
    return {"car_ims.tgz": tgz({f"car_ims/{i:06d}.jpg": _jpeg(i) for i in range(1, n + 1)}),
            "cars_annos.mat": cars_annos(per_class)}


def sop_zip(train: dict, test: dict) -> bytes:
    """Stanford_Online_Products/{Ebay_train.txt, Ebay_test.txt, <super>_final/*.JPG} with the real header."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("Stanford_Online_Products/", b"")
        image_id = 0
        for split, per_class in (("train", train), ("test", test)):
            lines = ["image_id class_id super_class_id path"]
            for cls in sorted(per_class):
                sup = 1 + cls % 2
                name = ("bicycle", "cabinet")[sup - 1]
                for k in range(per_class[cls]):
                    image_id += 1
                    rel = f"{name}_final/{cls * 1000 + k}_{k}.JPG"
                    z.writestr(f"Stanford_Online_Products/{rel}", _jpeg(image_id))
                    lines.append(f"{image_id} {cls} {sup} {rel}")
            z.writestr(f"Stanford_Online_Products/Ebay_{split}.txt", "\n".join(lines) + "\n")
        z.writestr("Stanford_Online_Products/LICENSE", "MIT\n")
    return out.getvalue()


# Small data sets: the readers report them as partial copies of the official counts.
SMALL = {
    "cub200": lambda: {"CUB_200_2011.tgz": tgz(cub_members({1: 3, 2: 2, 100: 1, 101: 2, 200: 3}))},
    "cars196": lambda: cars_files({1: 2, 98: 3, 99: 1, 196: 2}),
    "sop": lambda: {"Stanford_Online_Products.zip": sop_zip({1: 2, 2: 3}, {3: 2, 4: 1, 5: 2})},
}
SMALL_SUMMARY = {
    "cub200": "cub200: partial copy: 6 of 5,864 training images (3 of 100 classes), 5 of 5,924 test images (2 of 100 "
              "classes)",
    "cars196": "cars196: partial copy: 5 of 8,054 training images (2 of 98 classes), 3 of 8,131 test images (2 of 98 "
               "classes)",
    "sop": "sop: partial copy: 5 of 59,551 training images (2 of 11,318 classes), 5 of 60,502 test images (3 of "
           "11,316 classes)",
}


@pytest.fixture(scope="module")
def full_cub():
    """CUB_200_2011.tgz with the official counts (5,864 + 5,924 images in 100 + 100 classes), tiny JPEGs."""
    per_class = {c: 59 if c <= 64 else 58 for c in range(1, 101)}
    per_class.update({c: 60 if c <= 124 else 59 for c in range(101, 201)})
    assert sum(per_class[c] for c in range(1, 101)) == 5864 and sum(per_class[c] for c in range(101, 201)) == 5924
    return tgz(cub_members(per_class))


# ------------------------------------------------------------------------------------------- the server


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        srv = self.server
        with srv.lock:
            srv.requests.append((self.path, self.headers.get("Range")))
            count = len(srv.requests)
            plan = srv.plans.get(self.path)
            behaviour = plan.pop(0) if plan else "ok"
        if count > MAX_REQUESTS:
            self.send_error(503, "request budget of the test server used up")
            return
        if isinstance(behaviour, tuple) and behaviour[0] == "redirect":  # as CaltechDATA and Drive do
            self.send_response(302)
            self.send_header("Location", srv.url + behaviour[1])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if behaviour == "close":
            self.close_connection = True  # no status line at all
            return
        if isinstance(behaviour, int):
            self.send_error(behaviour)
            return
        if behaviour == "html":
            page = b"<html><body>Google Drive can't scan this file for viruses. Download anyway?</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)
            return
        body = srv.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and behaviour != "ignore_range":
            first, _, last = rng.split("=", 1)[1].partition("-")
            start = int(first)
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            end = int(last) if last else len(body) - 1
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(body)}")
            part = body[start:end + 1]
        else:
            self.send_response(200)
            part = body
        self.send_header("Content-Type", "application/octet-stream")
        if isinstance(behaviour, tuple) and behaviour[0] == "cut":  # no length announced, body ends early
            self.end_headers()
            self.wfile.write(part[:behaviour[1]])
            return
        self.send_header("Content-Length", str(len(part)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if isinstance(behaviour, tuple) and behaviour[0] == "slow":  # ("slow", bytes per write, seconds between)
            for i in range(0, len(part), behaviour[1]):
                self.wfile.write(part[i:i + behaviour[1]])
                self.wfile.flush()
                time.sleep(behaviour[2])
            return
        if isinstance(behaviour, tuple) and behaviour[0] == "drop":
            self.wfile.write(part[:behaviour[1]])  # then hang up in the middle of the body
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(part)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # a client that hangs up mid-body is part of the tests
        pass


@pytest.fixture
def server():
    """A local HTTP server: .files {path: bytes}, .plans {path: [behaviour per request]}, .requests log, .url."""
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.files, srv.plans, srv.requests, srv.lock = {}, {}, [], threading.Lock()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(5)
    assert len(srv.requests) <= MAX_REQUESTS


def local_sources(srv, dataset: str, files: dict, prefix: str = "", mirrors=(), digests=None) -> dict:
    """The built-in table with `dataset`'s URLs pointing at the server and checksums of the test's archives.

    files: {name: bytes}, served at /<prefix><name>; mirrors: more URL prefixes tried after it (each serving the
    same bytes when registered in srv.files); digests: {name: (md5, sha256)} to publish instead of the true ones.
    """
    real = download.SOURCES[dataset]
    new_files = []
    for f in real.files:
        data = files[f.name]
        md5, sha = (digests or {}).get(f.name, (hashlib.md5(data).hexdigest(), hashlib.sha256(data).hexdigest()))
        srv.files[f"/{prefix}{f.name}"] = data
        urls = [f"{srv.url}/{prefix}{f.name}"] + [f"{srv.url}/{m}{f.name}" for m in mirrors]
        new_files.append(dataclasses.replace(
            f, variants=(download.Variant(len(data), (download.Digest("sha256", sha, "this test"),
                                                      download.Digest("md5", md5, "this test")), "test archive"),),
            sources=tuple(download.Source(u, "official" if i == 0 else "mirror") for i, u in enumerate(urls))))
    return {**download.SOURCES, dataset: dataclasses.replace(real, files=tuple(new_files))}


def fetch(dataset, data_dir, table, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("retry_wait", 0.0)
    kw.setdefault("timeout", 10.0)
    return download.download_dataset(dataset, data_dir, sources=table, **kw)


def unpacked_files(root: Path) -> list:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "downloads" not in p.parts)


# ------------------------------------------------------------------------------------- progress lines


def test_progress_line_bytes_rate_and_time_left():
    assert [format_bytes(n) for n in (0, 512, 1536, 1_150_585_339, 3_083_860_082)] == [
        "0 B", "512 B", "1.50 KiB", "1.07 GiB", "2.87 GiB"]
    assert [format_duration(s) for s in (0, 75, 3725)] == ["0:00", "1:15", "1:02:05"]
    now = [100.0]
    out = io.StringIO()  # not a terminal: whole lines, one per 10 s, plus the last
    bar = ByteProgress("cub200 CUB_200_2011.tgz", total=100 * 2**20, done=20 * 2**20, stream=out,
                       clock=lambda: now[0])
    now[0] = 105.0
    bar.update(2**20)  # 5 s after the start: not drawn yet
    now[0] = 110.0
    bar.update(19 * 2**20)  # 20 MiB in 10 s: 2 MiB/s; 60 MiB left: 30 s
    now[0] = 115.0
    bar.update(10 * 2**20)  # within 10 s of the last line: not drawn
    now[0] = 120.0
    bar.close()
    assert out.getvalue().splitlines() == [
        "cub200 CUB_200_2011.tgz: 40.0 MiB of 100.0 MiB (40%), 2.00 MiB/s, 0:30 left",
        "cub200 CUB_200_2011.tgz: 50.0 MiB of 100.0 MiB (50%), 1.50 MiB/s, 0:33 left, 0:20 in all"]
    tty = io.StringIO()
    tty.isatty = lambda: True  # a terminal: redrawn in place every 0.2 s, no time left before 1 s
    bar = ByteProgress("x", total=1000, stream=tty, clock=lambda: now[0])
    now[0] += 0.5
    bar.update(100)
    now[0] += 0.1
    bar.update(100)
    now[0] += 0.5
    bar.update(100)
    bar.close()
    assert tty.getvalue() == ("\rx: 100 B of 1000 B (10%), 200 B/s"
                              "\rx: 300 B of 1000 B (30%), 272 B/s, 0:03 left"
                              "\rx: 300 B of 1000 B (30%), 272 B/s, 0:03 left, 0:01 in all\n")


# ------------------------------------------------------------------------------------------- the table


def test_builtin_table_is_complete_and_survives_json():
    from hdml_tf.data import datasets
    assert set(download.SOURCES) == {"cub200", "cars196", "sop"} <= set(datasets.names())
    for name, src in download.SOURCES.items():
        assert src.dataset == name and src.files and src.homepage.startswith("https://")
        for f in src.files:
            assert f.format in download.FORMATS and f.required and f.sources
            assert any(s.role == "official" for s in f.sources)
            for v in f.variants:
                assert v.digests and all(len(d.value) == download.ALGORITHMS[d.algorithm] and d.source
                                         for d in v.digests)
            for s in f.sources:
                assert s.url.split(":")[0] in ("http", "https", "ftp") and 0 <= s.variant < len(f.variants)
    # Each archive unpacks to what its reader looks for first.
    cub = download.SOURCES["cub200"].files[0]
    assert {"CUB_200_2011/images.txt", "CUB_200_2011/image_class_labels.txt", "CUB_200_2011/classes.txt"} <= set(
        cub.required)
    assert [f.name for f in download.SOURCES["cars196"].files] == ["car_ims.tgz", "cars_annos.mat"]
    assert "Stanford_Online_Products/Ebay_train.txt" in download.SOURCES["sop"].files[0].required
    text = download.sources_to_json(download.SOURCES)
    assert download.sources_from_json(text) == download.SOURCES
    assert json.loads(text)["sop"]["files"][0]["variants"][0]["size"] == 3_083_860_082


@pytest.mark.parametrize("edit, message", [
    (lambda t: t["cub200"]["files"][0].pop("name"), "sources.json: cub200.files[0] has no field 'name'"),
    (lambda t: t["cub200"]["files"][0]["variants"][0]["digests"][0].update(value="abc"),
     "cub200.files[0].variants[0].digests[0].value 'abc' is not 64 hex digits"),
    (lambda t: t["sop"]["files"][0]["variants"][0]["digests"][1].update(algorithm="sha1"),
     "sop.files[0].variants[0].digests[1].algorithm is 'sha1'; expected one of md5, sha256"),
    (lambda t: t["cars196"]["files"][1]["sources"][0].update(variant=3), "cars196.files[1].sources[0].variant is 3"),
    (lambda t: t["cub200"]["files"][0].update(format="rar"), "cub200.files[0].format is 'rar'"),
    (lambda t: t["sop"]["files"][0]["variants"][0].update(digests=[]), "has no digests"),
])
def test_sources_json_errors_name_the_field(edit, message):
    table = json.loads(download.sources_to_json(download.SOURCES))
    edit(table)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        download.sources_from_json(json.dumps(table), origin="sources.json")
    with pytest.raises(ConfigError, match="sources.json is not JSON"):
        download.sources_from_json("{", origin="sources.json")


# --------------------------------------------------------------------------------------- full downloads


@pytest.mark.parametrize("dataset", ["cub200", "cars196", "sop"])
def test_download_unpacks_into_the_readers_layout(server, tmp_path, dataset):
    files = SMALL[dataset]()
    table = local_sources(server, dataset, files)
    out = io.StringIO()
    result = fetch(dataset, tmp_path, table, progress=True, stream=out)
    assert not result.already_complete
    assert result.report.summary() == f"{SMALL_SUMMARY[dataset]} in {tmp_path}"
    # The reader finds every image the archive holds, under the names the archive gives them.
    train, test = readers.read_dataset(dataset, tmp_path)
    for path in train.paths + test.paths:
        assert Path(path).read_bytes() == _member_bytes(files, dataset, Path(path).relative_to(tmp_path).as_posix())
    assert [r[1] for r in server.requests] == [None] * len(files)  # one plain GET per file, nothing resumed
    # The progress lines end at 100 %; the archives are verified and kept (the copy is partial, so no deletion).
    assert all(f"{dataset} {name}: " in out.getvalue() for name in files)
    assert "(100%)" in out.getvalue()
    assert sorted(os.listdir(tmp_path / "downloads")) == sorted(files)
    assert not any(".unpacking" in p for p in unpacked_files(tmp_path))
    assert any(line.startswith("downloaded ") and "verified" in line for line in result.steps)


def _member_bytes(files: dict, dataset: str, rel: str) -> bytes:
    """The bytes of one member of the test's archives, read back with the standard library."""
    if dataset == "sop":
        with zipfile.ZipFile(io.BytesIO(files["Stanford_Online_Products.zip"])) as z:
            return z.read(rel)
    name = "CUB_200_2011.tgz" if dataset == "cub200" else "car_ims.tgz"
    with tarfile.open(fileobj=io.BytesIO(files[name])) as tar:
        return tar.extractfile(rel).read()


def test_tool_downloads_complete_cub_then_leaves_it_alone(server, tmp_path, full_cub):
    """The tool as a subprocess, with the official counts: complete, archive deleted; a second run fetches nothing."""
    table = local_sources(server, "cub200", {"CUB_200_2011.tgz": full_cub})
    sources = tmp_path / "sources.json"
    sources.write_text(download.sources_to_json({"cub200": table["cub200"]}))
    data = tmp_path / "data"
    cmd = [sys.executable, str(ROOT / "tools" / "download.py"), "cub200", f"--data_dir={data}",
           f"--sources={sources}", "--timeout=20"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = (f"cub200: complete: 5,864 of 5,864 training images (100 of 100 classes), 5,924 of 5,924 test images "
               f"(100 of 100 classes) in {data}")
    lines = done.stdout.strip().splitlines()
    assert lines[-2:] == [summary, f"train with: --dataset=cub200 --data_dir={data}"]
    assert f"downloaded CUB_200_2011.tgz from {server.url}/CUB_200_2011.tgz (official) and verified it" in lines
    assert "cub200 CUB_200_2011.tgz: " in done.stderr and "(100%)" in done.stderr  # the progress line
    assert not (data / "downloads").exists()  # complete: the downloaded archive is deleted
    assert len(unpacked_files(data)) == 11788 + 5
    first = data / "CUB_200_2011" / "images.txt"
    stamp = first.stat().st_mtime_ns
    assert len(server.requests) == 1

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.splitlines()[0] == f"nothing to do, a complete copy is already there: {summary}"
    assert len(server.requests) == 1 and first.stat().st_mtime_ns == stamp  # no request, nothing rewritten

    # A partial copy (one image lost) is reported and completed from the archive.
    lost = Path(readers.read_cub200(data).train.paths[7])
    lost.unlink()
    result = fetch("cub200", data, table, keep_archives=True)
    assert result.steps[0].startswith("found a partial copy (cub200: partial copy: 5,863 of 5,864 training images")
    assert lost.is_file() and not result.report.partial and len(server.requests) == 2
    assert (data / "downloads" / "CUB_200_2011.tgz").read_bytes() == full_cub  # kept on request

    # A wrong checksum through the tool: one error line, exit code 2.
    wrong = local_sources(server, "cub200", {"CUB_200_2011.tgz": full_cub}, prefix="other/",
                          digests={"CUB_200_2011.tgz": (hashlib.md5(full_cub).hexdigest(), "0" * 64)})
    sources.write_text(download.sources_to_json({"cub200": wrong["cub200"]}))
    failed = subprocess.run(cmd[:3] + [f"--data_dir={tmp_path / 'data2'}"] + cmd[4:], capture_output=True, text=True,
                            timeout=300)
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert failed.returncode == 2 and len(errors) == 1 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
    assert errors[0].startswith(f"error: CUB_200_2011.tgz from {server.url}/other/CUB_200_2011.tgz does not match "
                                "its published checksum: sha256 ")
    assert not (tmp_path / "data2" / "CUB_200_2011").exists()


def test_tool_usage_errors_are_one_line(tmp_path):
    tool = str(ROOT / "tools" / "download.py")
    for args, message in [
            ([], "error: expected one data set name (cub200, cars196, sop) before the flags, got nothing: "
                 "python tools/download.py cub200 --data_dir=DIR"),
            (["folder", f"--data_dir={tmp_path}"], "error: expected one data set name (cub200, cars196, sop) before "
                                                   "the flags, got folder: python tools/download.py cub200 "
                                                   "--data_dir=DIR"),
            (["sop"], "error: --data_dir is required (the folder to unpack into, later passed to --data_dir)"),
            (["sop", f"--data_dir={tmp_path}", f"--sources={tmp_path / 'absent.json'}"],
             f"error: --sources file {tmp_path / 'absent.json'} not found; expected a JSON table of sources"),
            (["cub200", f"--data_dir={tmp_path}", f"--archive={tmp_path / 'absent.tgz'}"],
             f"error: archive {tmp_path / 'absent.tgz'} not found; expected CUB_200_2011.tgz of cub200")]:
        done = subprocess.run([sys.executable, tool] + args, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and done.stderr.strip().splitlines() == [message], done.stderr
    shown = subprocess.run([sys.executable, tool, "sop", "--show_sources"], capture_output=True, text=True,
                           timeout=60)
    assert shown.returncode == 0
    assert "b04fa78210e69fab050ce73939550e1cd0f96890bdd98ec9fee732c3b756ef48" in shown.stdout
    assert "official http://ftp.cs.stanford.edu/cs/cvgl/Stanford_Online_Products.zip" in shown.stdout


# ------------------------------------------------------------------------------ interruptions and resuming


def test_interrupted_download_resumes_with_a_range_request(server, tmp_path):
    files = SMALL["cub200"]()
    data = files["CUB_200_2011.tgz"]
    table = local_sources(server, "cub200", files)
    server.plans["/CUB_200_2011.tgz"] = [("drop", 700)]  # the first answer hangs up after 700 bytes
    with pytest.raises(download.DownloadInterrupted) as info:
        fetch("cub200", tmp_path, table, retries=0)
    message = str(info.value)
    assert message.startswith(f"downloading CUB_200_2011.tgz from {server.url}/CUB_200_2011.tgz stopped at 700 of "
                              f"{len(data):,} bytes (")
    assert message.endswith("is kept: run the same command again to resume") and "\n" not in message
    partial = download._partial_path(tmp_path / "downloads", table["cub200"].files[0],
                                     f"{server.url}/CUB_200_2011.tgz")
    assert partial.read_bytes() == data[:700]
    assert not (tmp_path / "CUB_200_2011").exists()

    result = fetch("cub200", tmp_path, table, retries=0)  # the same call again
    assert server.requests == [("/CUB_200_2011.tgz", None), ("/CUB_200_2011.tgz", "bytes=700-")]
    assert f"resumed CUB_200_2011.tgz at byte 700 from {server.url}/CUB_200_2011.tgz" in result.steps
    assert (tmp_path / "downloads" / "CUB_200_2011.tgz").read_bytes() == data and not partial.exists()
    assert result.report.train.images == 6 and result.report.test.images == 5


def test_ctrl_c_keeps_the_partial_file_and_the_next_run_resumes(server, tmp_path):
    """SIGINT to the tool in the middle of a slow transfer: one line, exit 130, the bytes so far kept; then resume."""
    files = SMALL["sop"]()
    data = files["Stanford_Online_Products.zip"]
    table = local_sources(server, "sop", files)
    server.plans["/Stanford_Online_Products.zip"] = [("slow", 128, 0.05)]  # about 3 s for the whole file
    sources = tmp_path / "sources.json"
    sources.write_text(download.sources_to_json({"sop": table["sop"]}))
    partial = download._partial_path(tmp_path / "data" / "downloads", table["sop"].files[0],
                                     f"{server.url}/Stanford_Online_Products.zip")
    tool = subprocess.Popen([sys.executable, str(ROOT / "tools" / "download.py"), "sop",
                             f"--data_dir={tmp_path / 'data'}", f"--sources={sources}", "--noprogress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (partial.exists() and partial.stat().st_size >= 512) and time.monotonic() < deadline:
        time.sleep(0.02)
    tool.send_signal(signal.SIGINT)
    _, err = tool.communicate(timeout=60)
    assert tool.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == (f"interrupted: partial downloads stay in "
                                            f"{tmp_path / 'data' / 'downloads'}; run the same command again to resume")
    have = partial.stat().st_size
    assert 512 <= have < len(data) and partial.read_bytes() == data[:have]
    assert not (tmp_path / "data" / "Stanford_Online_Products").exists()
    result = fetch("sop", tmp_path / "data", table)
    assert server.requests[-1] == ("/Stanford_Online_Products.zip", f"bytes={have}-")
    assert result.report.train.images == 5


def test_resume_through_a_redirect_keeps_the_range(server, tmp_path):
    files = SMALL["cub200"]()
    data = files["CUB_200_2011.tgz"]
    table = local_sources(server, "cub200", files, prefix="record/")
    server.files["/storage/CUB_200_2011.tgz"] = data
    server.plans["/record/CUB_200_2011.tgz"] = [("redirect", "/storage/CUB_200_2011.tgz")] * 2
    server.plans["/storage/CUB_200_2011.tgz"] = [("drop", 1200)]
    result = fetch("cub200", tmp_path, table, retries=1)
    assert server.requests == [("/record/CUB_200_2011.tgz", None), ("/storage/CUB_200_2011.tgz", None),
                               ("/record/CUB_200_2011.tgz", "bytes=1200-"),
                               ("/storage/CUB_200_2011.tgz", "bytes=1200-")]
    assert result.report.train.images == 6


def test_broken_transfer_is_resumed_within_one_call(server, tmp_path):
    files = SMALL["sop"]()
    data = files["Stanford_Online_Products.zip"]
    table = local_sources(server, "sop", files)
    server.plans["/Stanford_Online_Products.zip"] = [("drop", 1000), ("drop", 500)]
    result = fetch("sop", tmp_path, table, retries=2)
    assert [r[1] for r in server.requests] == [None, "bytes=1000-", "bytes=1500-"]
    assert (tmp_path / "downloads" / "Stanford_Online_Products.zip").read_bytes() == data
    assert result.report.train.images == 5


def test_server_without_range_support_starts_again_from_zero(server, tmp_path):
    files = SMALL["cub200"]()
    table = local_sources(server, "cub200", files)
    server.plans["/CUB_200_2011.tgz"] = [("drop", 900), "ignore_range"]
    result = fetch("cub200", tmp_path, table, retries=1)
    assert [r[1] for r in server.requests] == [None, "bytes=900-"]  # asked to resume, got the whole file (200)
    assert f"{server.url}/CUB_200_2011.tgz does not resume; CUB_200_2011.tgz starts again from byte 0" in result.steps
    assert (tmp_path / "downloads" / "CUB_200_2011.tgz").read_bytes() == files["CUB_200_2011.tgz"]


def test_server_that_keeps_dropping_gives_a_resumable_error(server, tmp_path):
    files = SMALL["cub200"]()
    table = local_sources(server, "cub200", files)
    server.plans["/CUB_200_2011.tgz"] = [("drop", 300)] * 3
    with pytest.raises(download.DownloadInterrupted, match=r"stopped at 900 of [\d,]+ bytes \(.*\); the partial file "
                       r".* is kept: run the same command again to resume"):
        fetch("cub200", tmp_path, table, retries=2)
    assert [r[1] for r in server.requests] == [None, "bytes=300-", "bytes=600-"]
    assert not (tmp_path / "CUB_200_2011").exists()
    result = fetch("cub200", tmp_path, table, retries=0)  # the server behaves again: the run finishes the file
    assert server.requests[-1][1] == "bytes=900-" and result.report.train.images == 6


def test_a_partial_download_resumes_from_its_own_source_first(server, tmp_path):
    """Mirrors may serve other bytes, so the source a partial file came from is asked first, with Range."""
    files = SMALL["cub200"]()
    table = local_sources(server, "cub200", files, prefix="first/", mirrors=("second/",))
    server.files["/second/CUB_200_2011.tgz"] = files["CUB_200_2011.tgz"]
    server.plans["/first/CUB_200_2011.tgz"] = [503]
    server.plans["/second/CUB_200_2011.tgz"] = [("drop", 800)]
    with pytest.raises(download.DownloadInterrupted, match="/second/CUB_200_2011.tgz stopped at 800 of"):
        fetch("cub200", tmp_path, table, retries=0)
    result = fetch("cub200", tmp_path, table, retries=0)  # /first/ works again, but /second/ holds 800 bytes
    assert server.requests[-1] == ("/second/CUB_200_2011.tgz", "bytes=800-") and len(server.requests) == 3
    assert result.report.train.images == 6


def test_whole_partial_file_of_unpublished_size_is_verified_after_http_416(server, tmp_path):
    """Without a published size a complete partial file is only known as such when the server answers 416."""
    files = SMALL["cars196"]()
    table = local_sources(server, "cars196", files)
    unsized = tuple(dataclasses.replace(f, variants=(dataclasses.replace(f.variants[0], size=None),))
                    for f in table["cars196"].files)
    table["cars196"] = dataclasses.replace(table["cars196"], files=unsized)
    (tmp_path / "downloads").mkdir()
    partial = download._partial_path(tmp_path / "downloads", unsized[0], f"{server.url}/car_ims.tgz")
    partial.write_bytes(files["car_ims.tgz"])
    result = fetch("cars196", tmp_path, table)
    assert server.requests == [("/car_ims.tgz", f"bytes={len(files['car_ims.tgz'])}-"), ("/cars_annos.mat", None)]
    assert result.report.train.images == 5 and not partial.exists()


def test_unusable_sources_are_skipped_in_order(server, tmp_path):
    """404, a web page, a hang-up without an answer: each is skipped with its reason; the last source works."""
    files = SMALL["cub200"]()
    table = local_sources(server, "cub200", files, prefix="gone/", mirrors=("page/", "mute/", "good/"))
    server.files.pop("/gone/CUB_200_2011.tgz")
    server.files["/good/CUB_200_2011.tgz"] = files["CUB_200_2011.tgz"]
    server.plans["/page/CUB_200_2011.tgz"] = ["html"]
    server.plans["/mute/CUB_200_2011.tgz"] = ["close", "close"]
    result = fetch("cub200", tmp_path, table, retries=1)
    assert [r[0] for r in server.requests] == ["/gone/CUB_200_2011.tgz", "/page/CUB_200_2011.tgz",
                                               "/mute/CUB_200_2011.tgz", "/mute/CUB_200_2011.tgz",
                                               "/good/CUB_200_2011.tgz"]
    assert f"downloaded CUB_200_2011.tgz from {server.url}/good/CUB_200_2011.tgz (mirror) and verified it" in \
        result.steps

    server.files.pop("/good/CUB_200_2011.tgz")
    server.plans["/page/CUB_200_2011.tgz"] = ["html"]
    server.plans["/mute/CUB_200_2011.tgz"] = ["close", "close"]
    with pytest.raises(DataError) as info:
        fetch("cub200", tmp_path / "again", table, retries=1)
    message = str(info.value)
    assert message.startswith(f"cub200: no source of CUB_200_2011.tgz could be used: "
                              f"{server.url}/gone/CUB_200_2011.tgz (HTTP 404 Not Found); "
                              f"{server.url}/page/CUB_200_2011.tgz (sent a web page (text/html) instead of the file: "
                              f"the host may want a login or a click to confirm); "
                              f"{server.url}/mute/CUB_200_2011.tgz (")
    assert "2 time(s)); " in message and message.endswith(download.SOURCES["cub200"].hint) and "\n" not in message


def test_a_source_with_another_size_is_skipped_before_downloading(server, tmp_path):
    files = SMALL["cub200"]()
    table = local_sources(server, "cub200", files, prefix="resized/", mirrors=("right/",))
    server.files["/resized/CUB_200_2011.tgz"] = files["CUB_200_2011.tgz"] + b"\0" * 10
    server.files["/right/CUB_200_2011.tgz"] = files["CUB_200_2011.tgz"]
    result = fetch("cub200", tmp_path, table)
    assert [r[0] for r in server.requests] == ["/resized/CUB_200_2011.tgz", "/right/CUB_200_2011.tgz"]
    assert result.report.train.images == 6 and result.report.test.images == 5


# ------------------------------------------------------------------------------------ verification, layout


def test_wrong_checksum_is_one_line_keeps_the_file_and_unpacks_nothing(server, tmp_path):
    files = SMALL["sop"]()
    data = files["Stanford_Online_Products.zip"]
    published = "9" * 64
    table = local_sources(server, "sop", files,
                          digests={"Stanford_Online_Products.zip": (hashlib.md5(data).hexdigest(), published)})
    with pytest.raises(download.ChecksumMismatch) as info:
        fetch("sop", tmp_path, table)
    message = str(info.value)
    url = f"{server.url}/Stanford_Online_Products.zip"
    partial = download._partial_path(tmp_path / "downloads", table["sop"].files[0], url)
    assert message == (f"Stanford_Online_Products.zip from {url} does not match its published checksum: sha256 "
                       f"{hashlib.sha256(data).hexdigest()}, expected {published} (published in this test); it is "
                       f"kept at {partial} and nothing was unpacked (delete it to download it again, or pass the "
                       f"official archive with --archive)")
    assert partial.read_bytes() == data  # kept under its temporary name, never renamed or unpacked
    assert os.listdir(tmp_path) == ["downloads"] and os.listdir(tmp_path / "downloads") == [partial.name]


def test_cut_short_without_any_size_is_a_mismatch_and_the_next_run_resumes(server, tmp_path):
    """Cars196 publishes no sizes; a server that announces none either and stops early looks finished."""
    files = SMALL["cars196"]()
    table = local_sources(server, "cars196", files)
    unsized = tuple(dataclasses.replace(f, variants=(dataclasses.replace(f.variants[0], size=None),))
                    for f in table["cars196"].files)
    table["cars196"] = dataclasses.replace(table["cars196"], files=unsized)
    server.plans["/car_ims.tgz"] = [("cut", 300)]
    assert len(files["car_ims.tgz"]) > 300
    with pytest.raises(download.ChecksumMismatch, match=r"car_ims.tgz from .* does not match its published "
                                                        r"checksum: .*\(if the transfer was cut short the same command "
                                                        r"resumes it; else delete it\)"):
        fetch("cars196", tmp_path, table)
    assert not (tmp_path / "car_ims").exists()
    result = fetch("cars196", tmp_path, table)
    assert server.requests == [("/car_ims.tgz", None), ("/car_ims.tgz", "bytes=300-"), ("/cars_annos.mat", None)]
    assert result.report.train.images == 5


def test_archive_with_the_wrong_layout_is_refused_before_unpacking(server, tmp_path):
    members = {k.replace("CUB_200_2011/", "CUB200/"): v for k, v in cub_members({1: 2, 150: 2}).items()}
    table = local_sources(server, "cub200", {"CUB_200_2011.tgz": tgz(members)})
    with pytest.raises(DataError) as info:
        fetch("cub200", tmp_path, table)
    assert str(info.value) == (f"{tmp_path / 'downloads' / 'CUB_200_2011.tgz'} does not hold CUB_200_2011/images.txt "
                               f"(its top level: CUB200/, attributes.txt); expected the official archive, which "
                               f"unpacks to {readers.CUB_LAYOUT}")
    assert os.listdir(tmp_path) == ["downloads"]
    # The .mat of Cars196 is checked too: a web page saved under its name is refused.
    cars = cars_files({1: 1, 150: 1})
    cars["cars_annos.mat"] = b"<html>not found</html>"
    table = local_sources(server, "cars196", cars)
    with pytest.raises(DataError, match=r"cars_annos.mat does not start with 'MATLAB'; expected cars_annos.mat in its "
                                        r"published format"):
        fetch("cars196", tmp_path / "cars", table)
    assert sorted(os.listdir(tmp_path / "cars")) == ["downloads"]


def test_failed_unpack_leaves_only_whole_files_and_the_next_run_completes(server, tmp_path, monkeypatch):
    files = SMALL["cub200"]()
    table = local_sources(server, "cub200", files)
    real_copy = download.shutil.copyfileobj
    calls = []

    def copy_until_the_disk_is_full(src, dst, length=0):
        calls.append(Path(dst.name))  # where the bytes go while they are written
        if len(calls) == 4:  # the 4th member: half of it, then ENOSPC
            dst.write(src.read(100))
            raise OSError(28, "No space left on device")
        return real_copy(src, dst, length)

    monkeypatch.setattr(download.shutil, "copyfileobj", copy_until_the_disk_is_full)
    with pytest.raises(DataError, match=r"unpacking .*CUB_200_2011.tgz into .* failed at '(.*)' \(OSError: \[Errno "
                                        r"28\] No space left on device\); the files unpacked so far are whole: free "
                                        r"some space and run the same command again") as info:
        fetch("cub200", tmp_path, table)
    failed = re.search(r"failed at '([^']*)'", str(info.value)).group(1)
    assert not (tmp_path / failed).exists()  # never a truncated file under its real name, even after a kill -9:
    assert all(p.name.startswith(".") and p.name.endswith(".unpacking") for p in calls)  # bytes go to a temp name
    written = unpacked_files(tmp_path)
    assert len(written) == 3 and not any("unpacking" in w for w in written)
    with tarfile.open(fileobj=io.BytesIO(files["CUB_200_2011.tgz"])) as tar:
        assert all((tmp_path / w).read_bytes() == tar.extractfile(w).read() for w in written)
    monkeypatch.setattr(download.shutil, "copyfileobj", real_copy)
    result = fetch("cub200", tmp_path, table)  # the verified archive is still in downloads/: no new request
    assert len(server.requests) == 1 and result.report.train.images == 6


def test_archive_that_is_not_one_is_a_clear_error(server, tmp_path):
    table = local_sources(server, "sop", {"Stanford_Online_Products.zip": b"PK\x03\x04 truncated"})
    with pytest.raises(DataError, match=r"Stanford_Online_Products.zip cannot be read as a zip archive \(BadZipFile: "
                                        r"File is not a zip file\); expected Stanford_Online_Products.zip as its "
                                        r"distributor publishes it"):
        fetch("sop", tmp_path, table)


@pytest.mark.parametrize("member", ["../escaped.txt", "/tmp/absolute.txt", "link"])
def test_unsafe_members_are_refused(server, tmp_path, member):
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for path, data in cub_members({1: 1, 101: 1}).items():
            info = tarfile.TarInfo(path)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo(member)
        if member == "link":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info, io.BytesIO(b""))
    table = local_sources(server, "cub200", {"CUB_200_2011.tgz": out.getvalue()})
    data_dir = tmp_path / "data"
    with pytest.raises(DataError, match="refusing to unpack it"):
        fetch("cub200", data_dir, table)
    assert os.listdir(data_dir) == ["downloads"] and not (tmp_path / "escaped.txt").exists()


# ----------------------------------------------------------------------------------------- --archive


def test_archive_given_by_the_user_is_verified_and_unpacked_without_network(server, tmp_path):
    files = SMALL["cars196"]()
    table = local_sources(server, "cars196", files)
    mine = tmp_path / "mine"
    mine.mkdir()
    for name, data in files.items():
        (mine / name).write_bytes(data)
    result = fetch("cars196", tmp_path / "data", table, archives=[mine / "cars_annos.mat", mine / "car_ims.tgz"])
    assert server.requests == []
    assert result.report.summary() == f"{SMALL_SUMMARY['cars196']} in {tmp_path / 'data'}"
    assert sorted(os.listdir(mine)) == ["car_ims.tgz", "cars_annos.mat"]  # the user's files stay
    assert (tmp_path / "data" / "cars_annos.mat").read_bytes() == files["cars_annos.mat"]

    # Only one of the two given: the other is downloaded.
    result = fetch("cars196", tmp_path / "mixed", table, archives=[mine / "car_ims.tgz"])
    assert server.requests == [("/cars_annos.mat", None)] and result.report.test.images == 3

    # A file that is none of the published archives: one line, nothing unpacked.
    other = tmp_path / "other.tgz"
    other.write_bytes(tgz({"car_ims/000001.jpg": b"x"}))
    with pytest.raises(download.ChecksumMismatch, match=rf"archive {other} \([\d,]+ bytes, sha256 [0-9a-f]{{64}}, md5 "
                       r"[0-9a-f]{32}\) is none of the published archives of cars196 \(car_ims.tgz: sha256 "):
        fetch("cars196", tmp_path / "bad", table, archives=[other])
    assert os.listdir(tmp_path / "bad") == [] and len(server.requests) == 1


def test_verified_archive_of_an_earlier_run_is_reused(server, tmp_path):
    files = SMALL["sop"]()
    table = local_sources(server, "sop", files)
    fetch("sop", tmp_path, table)  # partial (small) copy: the archive is kept
    result = fetch("sop", tmp_path, table)
    assert len(server.requests) == 1
    assert result.steps[1] == f"verified {tmp_path / 'downloads' / 'Stanford_Online_Products.zip'} (downloaded before)"


def test_file_urls_are_fetched_whole(tmp_path):
    files = SMALL["cub200"]()
    src = tmp_path / "mirror" / "CUB_200_2011.tgz"
    src.parent.mkdir()
    src.write_bytes(files["CUB_200_2011.tgz"])
    real = download.SOURCES["cub200"]
    data = files["CUB_200_2011.tgz"]
    f = dataclasses.replace(real.files[0], sources=(download.Source(src.as_uri(), "mirror"),), variants=(
        download.Variant(len(data), (download.Digest("md5", hashlib.md5(data).hexdigest(), "test"),)),))
    result = fetch("cub200", tmp_path / "data", {"cub200": dataclasses.replace(real, files=(f,))})
    assert result.report.train.images == 6


# ------------------------------------------------------------------------------------------- safeguards


def test_too_little_disk_space_stops_before_downloading(server, tmp_path, monkeypatch):
    table = local_sources(server, "sop", SMALL["sop"]())
    monkeypatch.setattr(download.shutil, "disk_usage", lambda path: type("U", (), {"free": 10})())
    with pytest.raises(DataError, match=r"downloading Stanford_Online_Products.zip needs [\d.]+ KiB in .*, but only "
                                        r"10 B are free; free some space or choose another --data_dir"):
        fetch("sop", tmp_path, table)
    assert server.requests == []


def test_a_second_download_into_the_same_folder_is_refused(server, tmp_path):
    fcntl = pytest.importorskip("fcntl", reason="advisory locks are POSIX-only")
    table = local_sources(server, "cub200", SMALL["cub200"]())
    (tmp_path / "downloads").mkdir()
    with open(tmp_path / "downloads" / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(DataError, match=f"another download into {tmp_path} is running"):
            fetch("cub200", tmp_path, table)
    assert server.requests == []


def test_unknown_dataset_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="dataset='folder' cannot be downloaded; expected one of cars196, cub200, "
                                          "sop"):
        download.download_dataset("folder", tmp_path)
