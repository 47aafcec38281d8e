"""Captioning whole collections: sidecar files, -o/--resume result files, progress on a terminal,
--shard jobs and torchrun processes (capcli.infer.collection, sidecars, result_files and shards, and
the caption/beam command in capcli/cli/caption.py)."""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import cli_env as _env
from conftest import run_cli as run

from capcli.data.listing import walk_images
from capcli.errors import CapcliError
from capcli.infer import result_files, shards
from capcli.infer.sidecars import Sidecars


@pytest.fixture
def collection_dir(shapes_dir, tmp_path) -> Path:
    """The 48 shape images spread over folders whose names have spaces and non-ASCII letters."""
    root = tmp_path / "photos"
    for k, image in enumerate(sorted((shapes_dir / "Images").glob("*.png"))):
        folder = root / ["", "a b", "a b/ü", "zz"][k % 4]
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(image, folder / (image.stem + (" é" if k % 5 == 0 else "") + ".png"))
    return root


def images_in(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.png"))


def tsv(result_text: str) -> dict[str, str]:
    return dict(line.split("\t", 1) for line in result_text.splitlines())


# --------------------------------------------------------------------------- listing

def test_folder_walk_gives_sorted_path_order_as_strings(tmp_path):
    names = ["a.jpg", "a/x.jpg", "a/b/y.png", "a b/z.jpg", "a-b.jpg", "ab.jpg", "é/q.jpg", "Z.jpg", "a.jpeg", "notes.txt"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    walked = walk_images(tmp_path)
    assert not isinstance(walked, list)  # found as the walk goes
    found = list(walked)
    assert all(type(p) is str for p in found)
    expected = sorted(p for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".txt")
    assert found == [str(p) for p in expected]


# --------------------------------------------------------------------------- sidecars

def test_sidecars_beside_the_images_hold_the_captions(trained_model, collection_dir):
    listing = run("caption", "-m", str(trained_model), "--format", "tsv", str(collection_dir))
    assert listing.exit_code == 0, listing.output
    captions = tsv(listing.stdout)
    result = run("caption", "-m", str(trained_model), str(collection_dir), "--sidecar", ".txt")
    assert result.exit_code == 0, result.output
    assert result.stdout == ""  # sidecars only, unless --format is given
    assert "sidecars: 48 written, 0 skipped (already there), 0 failed" in result.stderr
    for image in images_in(collection_dir):
        assert image.with_suffix(".txt").read_text(encoding="utf-8") == captions[str(image)] + "\n"
    assert any("ü" in str(p) and " é" in p.name for p in images_in(collection_dir))


def test_existing_sidecars_are_kept_and_their_images_not_read(trained_model, collection_dir):
    image = images_in(collection_dir)[3]
    image.write_bytes(b"not a png any more")  # would fail if it were decoded
    image.with_suffix(".txt").write_text("my own caption\n")
    result = run("caption", "-m", str(trained_model), str(collection_dir), "--sidecar", "txt")
    assert result.exit_code == 0, result.output
    assert image.with_suffix(".txt").read_text() == "my own caption\n"
    assert "sidecars: 47 written, 1 skipped (already there), 0 failed" in result.stderr

    again = run("caption", "-m", str(trained_model), str(collection_dir), "--sidecar", ".txt")
    assert again.exit_code == 0 and "0 written, 48 skipped" in again.stderr

    forced = run("caption", "-m", str(trained_model), str(collection_dir), "--sidecar", ".txt", "--overwrite")
    assert forced.exit_code == 1  # now the broken image is read, and fails
    assert f"capcli: {image}: not an image" in forced.stderr
    assert "sidecars: 47 written, 0 skipped (already there), 1 failed" in forced.stderr
    assert image.with_suffix(".txt").read_text() == "my own caption\n"  # a failed image's sidecar is left as it was


def test_unreadable_images_get_no_sidecar_and_exit_1(trained_model, collection_dir):
    bad = collection_dir / "a b" / "broken é.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    result = run("beam", "-m", str(trained_model), str(collection_dir), "--sidecar", ".txt")
    assert result.exit_code == 1
    assert not bad.with_suffix(".txt").exists()
    assert f"capcli: {bad}: " in result.stderr
    assert "sidecars: 48 written, 0 skipped (already there), 1 failed" in result.stderr
    assert "Traceback" not in result.output


def test_sidecar_dir_mirrors_the_tree_and_jsonl_sidecars(trained_model, collection_dir, tmp_path):
    out = tmp_path / "captions"
    result = run("caption", "-m", str(trained_model), str(collection_dir) + "/", "--sidecar-dir", str(out),
                 "--format", "jsonl")
    assert result.exit_code == 0, result.output
    images = images_in(collection_dir)
    assert not list(collection_dir.rglob("*.txt"))  # nothing beside the images
    printed = [json.loads(line) for line in result.stdout.splitlines()]  # --format given: stdout too
    assert [p["path"] for p in printed] == [str(i) for i in images]
    for image, record in zip(images, printed):
        sidecar = out / image.relative_to(collection_dir).with_suffix(".txt")
        assert json.loads(sidecar.read_text(encoding="utf-8")) == record


def test_two_images_with_one_sidecar_name_are_caught(trained_model, collection_dir):
    png = images_in(collection_dir)[0]
    jpg = png.with_suffix(".jpg")
    from PIL import Image

    Image.open(png).convert("RGB").save(jpg)
    result = run("caption", "-m", str(trained_model), str(collection_dir), "--sidecar", ".txt")
    assert result.exit_code == 1
    clash = f"capcli: {png}: its sidecar {png.with_suffix('.txt')} belongs to another image of this run"
    assert clash in result.stderr
    assert png.with_suffix(".txt").exists()
    # The next run keeps it failing, rather than count photo.png as done with photo.jpg's caption.
    again = run("caption", "-m", str(trained_model), str(collection_dir), "--sidecar", ".txt")
    assert again.exit_code == 1 and clash in again.stderr
    assert "sidecars: 0 written, 48 skipped (already there), 1 failed" in again.stderr


def test_sidecar_collisions_do_not_trust_modification_times(tmp_path, monkeypatch):
    """NFS clocks drift: a sidecar from an earlier run with an mtime in the future is not this run's,
    and one this run wrote with an mtime in the past is still caught."""
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "a.jpg").write_bytes(b"")
    (tmp_path / "b.png").write_bytes(b"")
    future = tmp_path / "b.txt"
    future.write_text("kept\n")
    os.utime(future, (time.time() + 3600, time.time() + 3600))
    sidecars = Sidecars(".txt", None, [str(tmp_path)], overwrite=False)
    assert not sidecars.wanted(str(tmp_path / "b.png"))  # an earlier run's: kept, its image skipped
    assert sidecars.wanted(str(tmp_path / "a.jpg")) and sidecars.wanted(str(tmp_path / "a.png"))
    assert sidecars.write(str(tmp_path / "a.jpg"), "one")
    os.utime(tmp_path / "a.txt", (0, 0))  # this run's, though its clock says 1970
    with pytest.raises(CapcliError, match="belongs to another image of this run"):
        sidecars.write(str(tmp_path / "a.png"), "two")
    assert (tmp_path / "a.txt").read_text() == "one\n"


@pytest.mark.parametrize("value, message", [(".png", "that is an image extension"), ("a/b", "expected an extension")])
def test_bad_sidecar_extensions(trained_model, collection_dir, value, message):
    result = run("caption", "-m", str(trained_model), str(collection_dir), "--sidecar", value)
    assert result.exit_code == 2 and message in result.stderr


# --------------------------------------------------------------------------- -o FILE, --resume

def test_output_file_format_from_its_suffix_and_no_silent_overwrite(trained_model, collection_dir, tmp_path):
    out = tmp_path / "out.tsv"
    first = run("beam", "-m", str(trained_model), str(collection_dir), "-o", str(out))
    assert first.exit_code == 0 and first.stdout == ""
    lines = out.read_text(encoding="utf-8").splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(p) for p in images_in(collection_dir)]
    before = out.read_bytes()
    again = run("beam", "-m", str(trained_model), str(collection_dir), "-o", str(out))
    assert again.exit_code == 2
    assert f"capcli: {out} already exists: add --resume" in again.stderr
    assert out.read_bytes() == before
    text = run("beam", "-m", str(trained_model), str(collection_dir), "-o", str(tmp_path / "out.txt"), "--resume")
    assert text.exit_code == 2 and "text output lacks" in text.stderr
    assert run("caption", "-m", str(trained_model), str(collection_dir), "--resume").exit_code == 2


def test_output_that_is_a_folder_is_one_clear_error(trained_model, collection_dir, tmp_path):
    result = run("caption", "-m", str(trained_model), str(collection_dir), "-o", str(tmp_path))
    assert result.exit_code == 2 and f"capcli: {tmp_path} is a folder: -o takes a file name" in result.stderr


def test_resume_skips_what_is_done_and_drops_a_half_line(trained_model, collection_dir, tmp_path):
    whole = tmp_path / "whole.jsonl"
    assert run("caption", "-m", str(trained_model), str(collection_dir), "-o", str(whole)).exit_code == 0
    lines = whole.read_text(encoding="utf-8").splitlines(keepends=True)
    part = tmp_path / "part.jsonl"
    part.write_text("".join(lines[:20]) + lines[20][:25], encoding="utf-8")  # killed while writing line 21
    resumed = run("caption", "-m", str(trained_model), str(collection_dir), "-o", str(part), "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "20 images were already done" in resumed.stderr
    assert part.read_text(encoding="utf-8") == "".join(lines)


def test_resume_refuses_a_file_that_is_not_results(tmp_path):
    bad = tmp_path / "notes.jsonl"
    bad.write_text('{"path": "a.jpg", "caption": "x"}\nhello\n')
    with pytest.raises(CapcliError, match=r"notes.jsonl line 2: not a capcli jsonl result line"):
        result_files.read_done(bad, "jsonl")


def test_sigkill_mid_run_then_resume_gives_every_image_once(trained_model, collection_dir, tmp_path):
    for k, image in enumerate(images_in(collection_dir)):  # 4 x 48 images, so the run lasts long enough to kill
        for copy in range(3):
            shutil.copy(image, image.with_name(f"{image.stem} {copy}.png"))
    images = [str(p) for p in images_in(collection_dir)]
    out = tmp_path / "out.tsv"
    cmd = [sys.executable, "-m", "capcli", "caption", "-m", str(trained_model), str(collection_dir), "-o", str(out),
           "--batch-size", "2", "--device", "cpu"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or out.read_text(encoding="utf-8").count("\n") < 10):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    cut = out.read_text(encoding="utf-8").count("\n")
    assert 10 <= cut < len(images), "the run was not killed mid-way"
    again = subprocess.run(cmd + ["--resume"], env=_env(), capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr
    got = [line.split("\t")[0] for line in out.read_text(encoding="utf-8").splitlines()]
    assert got == images  # every image once, in input order
    straight = run("caption", "-m", str(trained_model), str(collection_dir), "--format", "tsv", "--batch-size", "2")
    assert out.read_text(encoding="utf-8") == straight.stdout


# --------------------------------------------------------------------------- shares

def test_shards_cover_every_image_once_and_concatenate_to_one_process(trained_model, collection_dir, tmp_path):
    one = run("beam", "-m", str(trained_model), str(collection_dir), "--format", "jsonl", "--batch-size", "5")
    assert one.exit_code == 0
    out = tmp_path / "out.jsonl"
    for i in range(3):
        r = run("beam", "-m", str(trained_model), str(collection_dir), "--shard", f"{i}/3", "-o", str(out), "--batch-size", "5")
        assert r.exit_code == 0, r.output
    parts = sorted(tmp_path.glob("out.part-*-of-3.jsonl"))
    assert [p.name for p in parts] == ["out.part-0-of-3.jsonl", "out.part-1-of-3.jsonl", "out.part-2-of-3.jsonl"]
    assert "".join(p.read_text(encoding="utf-8") for p in parts) == one.stdout  # byte-identical, in order
    sizes = [len(p.read_text().splitlines()) for p in parts]
    assert sizes == [20, 15, 13]  # whole batches of 5: 4, 3 and 3 of the 10
    assert not out.exists()


@pytest.mark.parametrize("value, message", [("3/3", "I must be 0..2"), ("x", "expected I/N"), ("0/0", "I must be")])
def test_bad_shards(trained_model, collection_dir, value, message):
    result = run("caption", "-m", str(trained_model), str(collection_dir), "--shard", value)
    assert result.exit_code == 2 and message in result.stderr


def test_share_and_part_names():
    items = list(range(23))
    shares = [shards.share(items, i, 4, batch_size=3) for i in range(4)]
    assert sum(shares, []) == items  # 8 batches of 3 (the last short): 2 each
    assert [len(s) for s in shares] == [6, 6, 6, 5]
    assert shards.share(items, 3, 9, batch_size=10) == []  # more jobs than batches
    assert shards.part_path(Path("d/out.jsonl"), 3, 12) == Path("d/out.part-03-of-12.jsonl")


def test_merge_keeps_order_and_drops_repeats(tmp_path):
    out, a, b = tmp_path / "out.tsv", tmp_path / "a.tsv", tmp_path / "b.tsv"
    out.write_text("x.jpg\tone\n")
    a.write_text("x.jpg\tone again\ny.jpg\ttwo\n")
    b.write_text("z.jpg\tthree\n")
    assert shards.merge_parts(out, [a, b], "tsv") == 3
    assert out.read_text() == "x.jpg\tone\ny.jpg\ttwo\nz.jpg\tthree\n"
    assert not a.exists() and not b.exists()


def test_torchrun_two_processes_write_what_one_process_writes(trained_model, collection_dir, tmp_path):
    one = tmp_path / "one.jsonl"
    single = subprocess.run([sys.executable, "-m", "capcli", "beam", "-m", str(trained_model), str(collection_dir),
                             "-o", str(one), "--device", "cpu", "--batch-size", "5"], env=_env(), capture_output=True, text=True, timeout=240)
    assert single.returncode == 0, single.stderr
    two = tmp_path / "two.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "capcli",
           "beam", "-m", str(trained_model), str(collection_dir), "-o", str(two), "--device", "cpu", "--batch-size", "5"]
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    assert two.read_bytes() == one.read_bytes()
    assert "merged the results of 2 processes" in result.stderr
    assert sorted(p.name for p in tmp_path.glob("two*")) == ["two.jsonl"]  # the parts are gone

    again = subprocess.run(cmd + ["--resume"], env=_env(), capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr
    assert two.read_bytes() == one.read_bytes()  # nothing captioned twice

    to_stdout = subprocess.run(cmd[:cmd.index("-o")] + ["--device", "cpu"], env=_env(), capture_output=True, text=True, timeout=240)
    assert to_stdout.returncode != 0 and "under torchrun give -o FILE" in to_stdout.stderr
    from_stdin = [c if c != str(collection_dir) else "-" for c in cmd]
    shared = subprocess.run(from_stdin, env=_env(), capture_output=True, text=True, timeout=240, input=str(collection_dir))
    assert shared.returncode != 0 and "the processes cannot share stdin" in shared.stderr


# --------------------------------------------------------------------------- progress

def _on_a_terminal(args: list[str]) -> tuple[int, str, str]:
    """Run capcli with stderr on a pseudo-terminal; returns (exit code, stdout, what the terminal showed)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "capcli", *args], env=_env(COLUMNS="120"), stdout=subprocess.PIPE,
                            stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    shown = b""
    while True:
        ready, _, _ = select.select([master], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    out = proc.stdout.read().decode()
    proc.wait(timeout=60)
    os.close(master)
    return proc.returncode, out, shown.decode(errors="replace")


def test_progress_bar_on_a_terminal_only(trained_model, collection_dir):
    code, out, shown = _on_a_terminal(["caption", "-m", str(trained_model), str(collection_dir), "--device", "cpu",
                                       "--format", "tsv"])
    assert code == 0
    assert "48/48" in shown and "images" in shown and "failed 0" in shown
    assert len(out.splitlines()) == 48 and "48/48" not in out  # results alone on stdout
    code, out, shown = _on_a_terminal(["-q", "caption", "-m", str(trained_model), str(collection_dir), "--device", "cpu"])
    assert code == 0 and "48/48" not in shown
    piped = run("caption", "-m", str(trained_model), str(collection_dir))
    assert "48/48" not in piped.stderr
