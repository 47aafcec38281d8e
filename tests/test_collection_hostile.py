"""Collections under hostile conditions: FIFOs and devices named like images, file names no format
expects (not UTF-8, tabs, newlines, U+2028), two runs on one result file, sidecars that would
clobber images, bad PIL images, slow URLs, read-only targets, endless stdin, and torchrun
processes that fail alone (issue 19)."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import cli_env as _env
from conftest import run_cli as run
from conftest import shape_image

import capcli.data.images as images
from capcli.data.images import ImageError, load_image
from capcli.data.listing import STDIN_LINE_LIMIT
from capcli.errors import CapcliError
from capcli.infer import result_files, shards


def capcli(*args, input: bytes | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """capcli in its own process: a hang ends the test (TimeoutExpired) instead of the test run."""
    return subprocess.run([sys.executable, "-m", "capcli", *args], input=input, capture_output=True, env=_env(),
                          timeout=timeout)


def name(raw: bytes) -> str:
    """A file name from its bytes, as os.listdir gives it (bytes that are not UTF-8 as surrogates)."""
    return os.fsdecode(raw)


def pictures(folder: Path, *names: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, n in enumerate(names):
        paths.append(folder / n)
        shape_image(["red", "blue", "green", "yellow"][k % 4], "circle").save(paths[-1], "PNG")
    return paths


def stderr_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("capcli: ") and "warning" not in line]


# --------------------------------------------------------------------------- FIFOs and devices

def _without_hanging(fn, seconds: float = 10):
    """fn() in a thread; fails the test if it is still running after ``seconds``."""
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("out", _catch(fn)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "still blocked"
    return box["out"]


def _catch(fn):
    try:
        return fn()
    except Exception as e:
        return e


def test_fifos_sockets_and_devices_are_refused_unopened(tmp_path):
    fifo = tmp_path / "fifo.jpg"
    os.mkfifo(fifo)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "socket.png"))
    try:
        for path in (fifo, tmp_path / "socket.png", "/dev/null", "/dev/zero"):
            error = _without_hanging(lambda: load_image(path))
            assert isinstance(error, ImageError) and str(error) == "not a regular file", (path, error)
    finally:
        sock.close()
        try:  # a reader still blocked on the FIFO (the code before the fix) gets its writer, and ends
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass


def test_fifo_in_a_folder_on_the_command_line_and_on_stdin(trained_model, tmp_path):
    photos = tmp_path / "photos"
    a, b = pictures(photos, "a.png", "b.png")
    os.mkfifo(photos / "fifo.png")
    result = capcli("caption", "-m", str(trained_model), "--device", "cpu", "--format", "tsv",
                    str(photos), "/dev/null", "-", input=f"{photos / 'fifo.png'}\n{a}\n".encode(), timeout=60)
    assert result.returncode == 1
    assert stderr_lines(result.stderr.decode()) == [f"capcli: {photos / 'fifo.png'}: not a regular file",
                                                    "capcli: /dev/null: not a regular file",
                                                    f"capcli: {photos / 'fifo.png'}: not a regular file"]
    assert [line.split("\t")[0] for line in result.stdout.decode().splitlines()] == [str(a), str(b), str(a)]


def test_caption_file_that_is_a_fifo_or_a_device(tmp_path):
    from capcli.data.datasets import load_dataset

    pictures(tmp_path, "a.png")
    fifo = tmp_path / "captions.csv"
    os.mkfifo(fifo)
    error = _without_hanging(lambda: load_dataset(captions_file=fifo, images_dir=tmp_path))
    assert isinstance(error, CapcliError)
    assert error.message == f"{fifo}: not a regular file, and nothing wrote to it (a FIFO needs its writer first)"

    def write():  # a pipe with its writer, as `--captions <(zcat captions.csv.gz)` gives: read
        with open(fifo, "w") as f:
            f.write("image,caption\na.png,a red circle\n")

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    time.sleep(0.5)  # the writer is waiting in its open, as a shell's process substitution is
    dataset = _without_hanging(lambda: load_dataset(captions_file=fifo, images_dir=tmp_path))
    assert [s.captions for s in dataset.samples] == [("a red circle",)]

    error = _without_hanging(lambda: load_dataset(captions_file="/dev/zero", images_dir=tmp_path))
    assert isinstance(error, CapcliError) and error.message == "/dev/zero: not a regular file"


# --------------------------------------------------------------------------- file names

def test_names_that_are_not_utf8_are_captioned_written_as_they_are_and_resumed(trained_model, tmp_path):
    photos = tmp_path / "photos"
    good = pictures(photos, name(b"\xff.png"), name(b"caf\xe9.png"), "ok.png")
    broken = photos / name(b"\xfe broken.png")
    broken.write_bytes(b"not a png")
    listed = sorted(str(p) for p in [*good, broken])

    tsv = run("caption", "-m", str(trained_model), "--format", "tsv", str(photos))
    assert tsv.exit_code == 1, tsv.output
    paths = [line.split(b"\t")[0] for line in tsv.stdout_bytes.splitlines()]
    assert paths == [os.fsencode(p) for p in listed if p != str(broken)]  # the names' own bytes
    assert stderr_lines(tsv.stderr) == [f"capcli: {photos}/\\xfe broken.png: not an image (unrecognised format)"]

    out = tmp_path / "out.jsonl"
    first = run("caption", "-m", str(trained_model), str(photos), "-o", str(out))
    assert first.exit_code == 1
    data = out.read_bytes()
    assert data.isascii() and b'\\udcff.png"' in data  # escaped, never a byte that is not UTF-8
    assert [json.loads(line)["path"] for line in data.splitlines()] == listed  # json.loads gives the name back
    again = run("caption", "-m", str(trained_model), str(photos), "-o", str(out), "--resume")
    assert again.exit_code == 0, again.output
    assert "4 images were already done" in again.stderr and out.read_bytes() == data

    tsv_file = tmp_path / "out.tsv"
    assert run("caption", "-m", str(trained_model), str(photos), "-o", str(tsv_file)).exit_code == 1
    assert tsv_file.read_bytes() == tsv.stdout_bytes
    resumed = run("caption", "-m", str(trained_model), str(photos), "-o", str(tsv_file), "--resume")
    assert "3 images were already done (in" in resumed.stderr and "; 1 captioned now" in resumed.stderr
    assert tsv_file.read_bytes() == tsv.stdout_bytes  # only the broken one was tried again

    sidecars = run("caption", "-m", str(trained_model), str(photos), "--sidecar", ".txt")
    assert sidecars.exit_code == 1
    captions = {r["path"]: r.get("caption") for r in map(json.loads, data.splitlines())}
    assert (photos / name(b"\xff.txt")).read_text() == captions[str(good[0])] + "\n"


def test_names_that_are_not_utf8_on_stdin(trained_model, tmp_path):
    [picture] = pictures(tmp_path, name(b"\xff\r.png"))
    listing = os.fsencode(picture) + b"\r\n"  # a CRLF list: the last \r goes, the one in the name stays
    result = run("caption", "-m", str(trained_model), "--format", "tsv", "-", input=listing)
    assert result.exit_code == 0, result.output
    assert result.stdout_bytes.startswith(os.fsencode(picture) + b"\t")


def test_tsv_refuses_a_path_it_cannot_hold_and_no_line_forges_another_image(trained_model, tmp_path):
    photos = tmp_path / "photos"
    [forger] = pictures(photos, "victim.png\tx.png")
    out = tmp_path / "out.tsv"
    first = run("caption", "-m", str(trained_model), str(photos), "-o", str(out))
    assert first.exit_code == 1
    assert stderr_lines(first.stderr) == [f"capcli: {photos}/victim.png\\tx.png: its path has a tab or a newline, "
                                          f"which a tsv line cannot hold: use --format jsonl"]
    assert out.read_bytes() == b""  # no line that reads as victim.png's
    [victim, newline] = pictures(photos, "victim.png", "z\nvictim.png")
    second = run("caption", "-m", str(trained_model), str(photos), "-o", str(out), "--resume")
    assert second.exit_code == 1
    assert [line.split("\t")[0] for line in out.read_text().splitlines()] == [str(victim)]  # captioned after all
    assert out.read_text().count("\t") == 1
    assert f"capcli: {photos}/z\\nvictim.png: its path has a tab" in second.stderr


def test_jsonl_with_line_separators_in_names_resumes(trained_model, tmp_path):
    photos = tmp_path / "photos"
    pictures(photos, "a\u2028b.png", "c\x85d.png", "e\rf.png", "g\nh.png", "plain é.png")
    out = tmp_path / "out.jsonl"
    assert run("caption", "-m", str(trained_model), str(photos), "-o", str(out)).exit_code == 0
    text = out.read_text(encoding="utf-8")
    assert len(text.splitlines()) == 5  # readable with str.splitlines too: the separators are escaped
    assert "\\u2028" in text and "\\u0085" in text and "plain é" in text
    again = run("caption", "-m", str(trained_model), str(photos), "-o", str(out), "--resume")
    assert again.exit_code == 0, again.output
    assert "5 images were already done" in again.stderr and out.read_text(encoding="utf-8") == text


def test_odd_names_in_error_messages_stay_one_line(trained_model, tmp_path):
    bad = tmp_path / "x\n\x1b[31mred.png"
    bad.write_bytes(b"")
    result = run("caption", "-m", str(trained_model), str(bad))
    assert result.exit_code == 1
    assert result.stderr.splitlines()[0] == f"capcli: {tmp_path}/x\\n\\x1b[31mred.png: empty file"


def test_stdin_lines_are_bounded(trained_model):
    with open("/dev/zero", "rb") as zero:  # one endless line
        result = subprocess.run([sys.executable, "-m", "capcli", "caption", "-m", str(trained_model), "--device", "cpu"],
                                stdin=zero, capture_output=True, env=_env(), timeout=60)
    assert result.returncode == 2
    assert result.stderr.decode() == (f"capcli: stdin line 1: longer than {STDIN_LINE_LIMIT} bytes: "
                                      f"not a file name or URL (give one per line)\n")


# --------------------------------------------------------------------------- two runs on one file

def test_result_files_are_opened_for_appending_and_locked(tmp_path):
    out = tmp_path / "out.tsv"
    for resume in (False, True):  # made by this run, then continued
        results = result_files.ResultFile(out, "tsv", resume)
        assert fcntl.fcntl(results.file.fileno(), fcntl.F_GETFL) & os.O_APPEND
        with pytest.raises(CapcliError, match=rf"^{out}: another capcli run \(pid {os.getpid()}\) is writing it"):
            result_files.ResultFile(out, "tsv", resume=True)
        results.write(f"a{int(resume)}.png\tcaption")
        results.close()
    assert out.read_text() == "a0.png\tcaption\na1.png\tcaption\n"


def test_a_second_run_on_the_same_file_stops_at_once(trained_model, tmp_path):
    photos = tmp_path / "photos"
    listed = pictures(photos, *(f"{k}.png" for k in range(6)))
    out = tmp_path / "out.tsv"
    first = subprocess.Popen([sys.executable, "-m", "capcli", "caption", "-", "-o", str(out), "-m", str(trained_model),
                              "--device", "cpu"], stdin=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    try:
        deadline = time.time() + 60
        while not out.exists() and time.time() < deadline:  # made, and locked, before stdin is read
            time.sleep(0.05)
        time.sleep(0.2)
        second = capcli("caption", str(photos), "-o", str(out), "--resume", "-m", str(trained_model), "--device", "cpu",
                        timeout=60)
        assert second.returncode == 2
        assert second.stderr.decode() == (f"capcli: {out}: another capcli run (pid {first.pid}) is writing it: "
                                          f"let it finish, or choose another -o\n")
        _, err = first.communicate("".join(f"{p}\n" for p in listed).encode(), timeout=120)
    finally:
        first.kill()
    assert first.returncode == 0, err
    assert [line.split("\t")[0] for line in out.read_text().splitlines()] == [str(p) for p in listed]


# --------------------------------------------------------------------------- sidecars

@pytest.mark.parametrize("suffix", [".jfif", ".JPEG", "apng", ".Tif", ".qoi"])
def test_sidecar_extensions_pillow_opens_are_refused(trained_model, tmp_path, suffix):
    [picture] = pictures(tmp_path, "photo.jfif")
    before = picture.read_bytes()
    result = run("caption", "-m", str(trained_model), str(picture), "--sidecar", suffix, "--overwrite")
    assert result.exit_code == 2
    assert "that is an image extension; sidecars would replace images" in result.stderr
    assert picture.read_bytes() == before


def test_a_sidecar_never_replaces_its_own_image(trained_model, tmp_path):
    [odd, plain] = pictures(tmp_path, "photo.capimg", "other.png")  # a PNG under a name Pillow does not know
    before = odd.read_bytes()
    result = run("caption", "-m", str(trained_model), str(odd), str(plain), "--sidecar", ".capimg", "--overwrite")
    assert result.exit_code == 1
    assert f"capcli: {odd}: its sidecar would have its own extension .capimg, and replace it" in result.stderr
    assert odd.read_bytes() == before and (tmp_path / "other.capimg").is_file()


def test_a_sidecar_path_that_is_a_folder_is_a_failure_not_already_there(trained_model, tmp_path):
    [picture] = pictures(tmp_path, "photo.png")
    (tmp_path / "photo.txt").mkdir()
    result = run("caption", "-m", str(trained_model), str(picture), "--sidecar", ".txt")
    assert result.exit_code == 1
    assert f"capcli: {picture}: its sidecar {tmp_path / 'photo.txt'} is a folder" in result.stderr
    assert "sidecars: 0 written, 0 skipped (already there), 1 failed" in result.stderr


# --------------------------------------------------------------------------- targets that cannot be written

@pytest.fixture
def read_only(tmp_path):
    """A read-only filesystem (a tmpfs mounted ro); skipped where mounting is not allowed."""
    folder = tmp_path / "ro"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "none", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_targets_under_a_file_are_one_line(trained_model, tmp_path):
    [picture] = pictures(tmp_path, "a.png")
    blocker = tmp_path / "file"
    blocker.write_text("")
    for option, value, message in [
        ("-o", blocker / "sub" / "out.jsonl", f"{blocker / 'sub' / 'out.jsonl'}: cannot write (Not a directory)"),
        ("--sidecar-dir", blocker / "sc", f"{blocker / 'sc'}: cannot make the --sidecar-dir folder (Not a directory)"),
        ("--attention-dir", blocker / "att", f"{blocker / 'att'}: cannot make the --attention-dir folder (Not a directory)"),
    ]:
        result = run("caption", "-m", str(trained_model), str(picture), option, str(value))
        assert (result.exit_code, result.stderr) == (2, f"capcli: {message}\n"), option


def test_targets_on_a_read_only_filesystem_are_one_line(trained_model, tmp_path, read_only):
    [picture] = pictures(tmp_path, "a.png")
    for option, value, message in [
        ("-o", read_only / "sub" / "out.jsonl", f"{read_only / 'sub' / 'out.jsonl'}: cannot write (Read-only file system)"),
        ("-o", read_only / "out.jsonl", f"{read_only / 'out.jsonl'}: cannot write (Read-only file system)"),
        ("--sidecar-dir", read_only, f"{read_only}: cannot write in the --sidecar-dir folder"),
        ("--attention-dir", read_only / "att", f"{read_only / 'att'}: cannot make the --attention-dir folder (Read-only file system)"),
    ]:
        result = run("caption", "-m", str(trained_model), str(picture), option, str(value))
        assert (result.exit_code, result.stderr) == (2, f"capcli: {message}\n"), option


# --------------------------------------------------------------------------- PIL images through the API

def test_a_bad_pil_image_fails_alone(trained_model, tmp_path):
    from PIL import Image

    from capcli.infer.captioner import Captioner

    good = shape_image("red", "square")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(_png(good)[:120])  # of 187 bytes
    lazy = Image.open(truncated)  # opened, not decoded: Pillow finds the damage only when it loads
    premultiplied = good.convert("LA").convert("La")
    results = Captioner.load(trained_model, "cpu").caption([good, Image.new("RGB", (0, 3)), lazy, premultiplied, good])
    assert [r.ok for r in results] == [True, False, False, True, True]
    assert results[1].error == "empty image (0x3 pixels)"
    assert results[2].error == "cannot use this RGB image (OSError: image file is truncated)"
    assert results[0].caption == results[4].caption and all(r.path is None for r in results)


def _png(img) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- slow URLs

class Drip(BaseHTTPRequestHandler):
    """A server that sends its headers or its body a byte at a time, for 10 s at most."""

    def do_GET(self):
        if self.path == "/headers":
            for byte in b"HTTP/1.0 200 OK\r\nContent-Type: image/png\r\nX-Slow: " + b"a" * 100:
                if not self._send(bytes([byte])):
                    return
        else:
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            for _ in range(100):
                if not self._send(b"x"):
                    return

    def _send(self, data: bytes) -> bool:
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except OSError:  # the client hung up: as it should at its deadline
            return False
        time.sleep(0.1)
        return True

    def log_message(self, *args):
        pass


@pytest.fixture
def drip(monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Drip)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("path", ["/headers", "/body"])
def test_the_url_time_limit_bounds_a_download_that_drips(drip, monkeypatch, path):
    monkeypatch.setattr(images, "URL_TIMEOUT", 1.0)
    start = time.monotonic()
    with pytest.raises(ImageError, match=r"^timed out after 1 s$"):
        load_image(drip + path)
    assert time.monotonic() - start < 2.5  # a byte every 0.1 s, each read well within any socket timeout


# --------------------------------------------------------------------------- stopping early and shrinking

def test_a_stopped_batch_stream_drops_the_images_not_started(monkeypatch):
    """Ctrl-C (or any early end) while batches are queued: the images not started are dropped, not
    loaded first (16 slow URLs kept Ctrl-C waiting 30 s)."""
    started, lock = [], threading.Lock()

    def slow_load(item, **kw):
        with lock:
            started.append(item)
        time.sleep(0.3)
        raise ImageError("slow")

    monkeypatch.setattr(images, "load_image", slow_load)
    batches = images.image_batches(range(24), 8, batch_size=8, workers=2, overlap=True)
    next(batches)  # the first 8 loaded; the next 8 queued behind 2 threads
    start = time.monotonic()
    batches.close()
    assert time.monotonic() - start < 0.2
    time.sleep(0.8)
    assert len(started) <= 8 + 2 + 2  # at most what the two threads had begun, not the queued batch


def test_large_decoded_images_are_shrunk_before_their_mode_is_converted(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(images, "SHRINK_ABOVE_PIXELS", 10_000)
    rgba = Image.new("RGBA", (300, 200), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 150, 200))
    rgba.save(tmp_path / "big.png")
    img = load_image(tmp_path / "big.png", draft_size=64)
    assert img.mode == "RGB" and img.size == (100, 67)  # reduced by 3: still 64 on each side
    assert img.getpixel((10, 30)) == (0, 0, 255) and img.getpixel((90, 30)) == (255, 255, 255)
    sixteen = Image.new("I;16", (300, 200), 1000)
    sixteen.paste(60000, (0, 0, 150, 200))
    sixteen.save(tmp_path / "gray16.png")
    img = load_image(tmp_path / "gray16.png", draft_size=64)
    assert img.size == (100, 67) and img.getpixel((10, 30)) == (255, 255, 255) and img.getpixel((90, 30)) == (0, 0, 0)
    Image.new("RGB", (300, 200), (0, 200, 0)).save(tmp_path / "turned.tif", exif=_orientation(6))
    assert load_image(tmp_path / "turned.tif", draft_size=64).size == (67, 100)  # the TIFF's orientation kept
    assert load_image(tmp_path / "big.png", draft_size=101).size == (300, 200)  # a factor under 2: as it was


def _orientation(value: int):
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = value
    return exif


# --------------------------------------------------------------------------- torchrun

def test_torchrun_process_that_cannot_start_stops_every_process_with_one_line(trained_model, tmp_path):
    photos = tmp_path / "photos"
    pictures(photos, *(f"{k}.png" for k in range(8)))
    out = tmp_path / "out.jsonl"
    left = shards.part_path(out, 1, 2)
    left.write_text("")  # an earlier run's part: process 1 refuses it
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "capcli",
           "caption", "-m", str(trained_model), str(photos), "-o", str(out), "--device", "cpu", "--batch-size", "2"]
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=180)
    assert result.returncode != 0
    said = f"capcli: process 1 of 2: {left} already exists: add --resume to skip the images in it and append the rest, " \
           f"or choose another -o"
    said_lines = [line for line in result.stderr.splitlines() if line.startswith("capcli:")]
    assert said_lines and set(said_lines) == {said}  # each process says it (torchrun may stop the second first)
    assert "unexpected error" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.part-1-of-2.jsonl", "photos"]  # process 0's part gone
