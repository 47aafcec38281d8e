"""caption / beam from the command line: formats, order, stdin, exit codes, attention pictures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from capcli.cli import app
from conftest import COLOURS, SHAPES


def run(*args, input=None):
    return CliRunner().invoke(app, list(args), input=input)


@pytest.fixture(scope="module")
def images(shapes_dir) -> list[Path]:
    return sorted((shapes_dir / "Images").glob("*.png"))


def test_the_trained_model_captions_its_training_images(trained_model, images):
    result = run("caption", "-m", str(trained_model), "--format", "tsv", str(images[0].parent))
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().split("\n")
    assert [line.split("\t")[0] for line in lines] == [str(p) for p in images]  # sorted, every image
    right = 0
    for line in lines:
        path, caption = line.split("\t")
        colour, shape = Path(path).stem.split("_")[:2]
        right += colour in caption.split() and shape in caption.split()
        assert set(caption.split()) <= set(" ".join(f"a the is small one in middle on white background {c} {s}"
                                                     for c in COLOURS for s in SHAPES).split())
    assert right >= 0.8 * len(lines)


def test_text_output_keeps_input_order_with_bad_files_mixed_in(trained_model, images, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    order = [images[5], bad, images[0], tmp_path / "missing.png", images[20]]
    result = run("caption", "-m", str(trained_model), *map(str, order))
    assert result.exit_code == 1
    lines = result.stdout.split("\n")[:-1]
    assert len(lines) == 5 and lines[1] == "" and lines[3] == ""  # one line per input, failures empty
    assert all(lines[i] for i in (0, 2, 4))
    alone = run("caption", "-m", str(trained_model), str(images[5]), str(images[0]), str(images[20])).stdout.split("\n")
    assert [lines[0], lines[2], lines[4]] == alone[:3]
    assert f"capcli: {bad}: not an image" in result.stderr
    assert f"capcli: {tmp_path / 'missing.png'}: no such file" in result.stderr
    assert "Traceback" not in result.output


def test_stdin_paths_and_dash(trained_model, images):
    listing = "\n".join(map(str, images[:4])) + "\n"
    a = run("caption", "-m", str(trained_model), "-f", "tsv", "-", input=listing)
    b = run("caption", "-m", str(trained_model), "-f", "tsv", input=listing)  # no PATHS: stdin
    assert a.exit_code == b.exit_code == 0
    assert a.stdout == b.stdout
    assert [line.split("\t")[0] for line in a.stdout.strip().split("\n")] == list(map(str, images[:4]))


def test_jsonl_schema_with_nbest_and_errors(trained_model, images, tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    result = run("beam", "-m", str(trained_model), "-k", "3", "--nbest", "3", "-f", "jsonl", str(images[0]), str(empty))
    assert result.exit_code == 1
    good, bad = [json.loads(line) for line in result.stdout.strip().split("\n")]
    assert set(good) == {"path", "caption", "tokens", "score", "logprob", "alternatives"}
    assert good["path"] == str(images[0]) and good["caption"] == " ".join(good["tokens"])
    assert len(good["alternatives"]) == 2
    scores = [good["score"]] + [a["score"] for a in good["alternatives"]]
    assert scores == sorted(scores, reverse=True) and all(s < 0 for s in scores)
    assert set(bad) == {"path", "error"} and bad["path"] == str(empty)


def test_beam_one_equals_greedy_through_the_cli(trained_model, images):
    paths = list(map(str, images[::5]))
    greedy = run("caption", "-m", str(trained_model), "-f", "jsonl", *paths).stdout
    beam1 = run("beam", "-m", str(trained_model), "-k", "1", "-f", "jsonl", *paths).stdout
    assert [json.loads(x)["caption"] for x in greedy.split("\n") if x] == [json.loads(x)["caption"] for x in beam1.split("\n") if x]


def test_attention_pictures_have_a_panel_per_word(trained_model, images, tmp_path):
    out = tmp_path / "att"
    result = run("beam", "-m", str(trained_model), "-f", "jsonl", "--attention-dir", str(out), str(images[0]), str(images[7]))
    assert result.exit_code == 0, result.output
    for line in result.stdout.strip().split("\n"):
        r = json.loads(line)
        png = out / (Path(r["path"]).stem + ".png")
        with Image.open(png) as pic:
            assert pic.text["capcli:caption"] == r["caption"]
            n = len(r["tokens"])
            cols = min(5, n)
            rows = -(-n // cols)
            assert pic.size == (cols * 224, rows * (224 + 22))  # square 64 px sources -> 224 px panels


def test_usage_errors_exit_2(trained_model, images):
    assert run("beam", "-m", str(trained_model), "-k", "2", "--nbest", "3", str(images[0])).exit_code == 2
    assert run("caption", "-m", str(trained_model), "--format", "xml", str(images[0])).exit_code == 2
    missing = run("caption", "-m", "/nonexistent/model.safetensors", str(images[0]))
    assert missing.exit_code == 2 and "capcli: /nonexistent/model.safetensors: no such file" in missing.stderr


def test_empty_folder_is_an_error(trained_model, tmp_path):
    result = run("caption", "-m", str(trained_model), str(tmp_path))
    assert result.exit_code == 1 and "no images found" in result.stderr


def test_closed_stdout_ends_quietly(trained_model, images):
    """`capcli caption DIR | head -1`: no traceback, no complaint."""
    cmd = f"{sys.executable} -m capcli caption -m {trained_model} --batch-size 2 {images[0].parent} | head -1"
    proc = subprocess.run(["bash", "-c", f"set -o pipefail; {cmd}"], capture_output=True, text=True, timeout=120)
    assert proc.stdout.count("\n") == 1
    assert proc.stderr == ""
    assert proc.returncode in (0, 141)  # 141: killed by SIGPIPE is also quiet


def test_help_is_useful():
    result = run("--help")
    assert result.exit_code == 0
    for command in ("build-vocab", "train", "caption", "beam", "evaluate"):
        assert command in result.stdout
    beam = run("beam", "--help").stdout
    assert "--beam-size" in beam and "--nbest" in beam and "--length-penalty" in beam


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_capcli_keeps_freed_memory_instead_of_page_faulting_it_back():
    """Ten Lite0 batches of 4 images on the CPU: with glibc's defaults the activations are fresh
    mmaps that the kernel fills page by page (~20000 faults a batch); after keep_freed_memory, which
    every capcli command calls, the heap reuses the memory of the batch before."""
    script = (
        "import resource, sys, torch\n"
        "from capcli.cli import keep_freed_memory\n"
        "from capcli.model.encoders import Encoder\n"
        "if sys.argv[1] == 'keep': keep_freed_memory()\n"
        "encoder, x = Encoder('lite0').eval(), torch.randn(4, 3, 224, 224)\n"
        "with torch.inference_mode():\n"
        "    encoder(x)\n"
        "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    for _ in range(10):\n"
        "        encoder(x)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
    )
    faults = {mode: int(subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True,
                                       check=True).stdout) for mode in ("default", "keep")}
    assert faults["default"] > 10 * 5000
    assert faults["keep"] < faults["default"] / 10


def test_a_broken_pipe_on_the_way_out_ends_quietly():
    """The reader went away before Python's last flush of stdout: exit 0, nothing on stderr."""
    script = ("import sys\n"
              "from capcli.cli import frame\n"
              "def app():\n"
              "    raise BrokenPipeError(32, 'Broken pipe')\n"
              "frame.app = app\n"
              "frame.main()\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stderr == ""


def test_attention_pictures_of_one_run_never_share_a_file(trained_model, images, tmp_path):
    """a/dog.png and b/dog.png give dog.png and dog-2.png; a real c/dog-2.png must not overwrite the latter."""
    inputs = []
    for folder, name, source in (("a", "dog.png", images[0]), ("b", "dog.png", images[9]), ("c", "dog-2.png", images[20])):
        (tmp_path / folder).mkdir()
        inputs.append(tmp_path / folder / name)
        inputs[-1].write_bytes(source.read_bytes())
    out = tmp_path / "att"
    result = run("caption", "-m", str(trained_model), "-f", "jsonl", "--attention-dir", str(out), *map(str, inputs))
    assert result.exit_code == 0, result.output
    captions = [json.loads(line)["caption"] for line in result.stdout.strip().split("\n")]
    assert sorted(p.name for p in out.iterdir()) == ["dog-2-2.png", "dog-2.png", "dog.png"]
    for name, caption in zip(("dog.png", "dog-2.png", "dog-2-2.png"), captions):
        with Image.open(out / name) as pic:
            assert pic.text["capcli:caption"] == caption


def test_attention_panels_light_in_proportion_to_the_strongest_cell():
    import torch
    from PIL import ImageStat

    from capcli.infer import attention_pictures as attention_map

    image = Image.new("RGB", (64, 64), (200, 160, 120))
    mean = ImageStat.Stat(image.convert("L")).mean[0]
    uniform = attention_map.render(image, ["a", "b"], torch.full((2, 2, 2), 0.25))  # (T, h, w)
    panel = uniform.crop((0, 0, 224, 224)).convert("L")
    assert abs(ImageStat.Stat(panel).mean[0] - mean) < 2  # the whole scene lit, not dark

    peaked = torch.zeros(1, 2, 2)
    peaked[0, 0, 0] = 1.0  # all attention on the top-left cell
    panel = attention_map.render(image, ["a"], peaked).crop((0, 0, 224, 224)).convert("L")
    top_left, bottom_right = panel.getpixel((20, 20)), panel.getpixel((200, 200))
    assert abs(top_left - mean) < 2 and bottom_right < mean / 3


def test_url_arguments_are_printed_as_given(trained_model, shapes_dir, monkeypatch, tmp_path):
    """A URL is never turned into a Path (which collapses its //): tsv and jsonl give it back exactly."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(shapes_dir / "Images"))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("no_proxy", "*")
    try:
        url = f"http://127.0.0.1:{server.server_port}/red_square_0.png?size=64"
        tsv = run("caption", "-m", str(trained_model), "-f", "tsv", url)
        assert tsv.exit_code == 0, tsv.output
        assert tsv.stdout.split("\t")[0] == url
        jsonl = run("beam", "-m", str(trained_model), "-f", "jsonl", "--attention-dir", str(tmp_path),
                    url + "&x=1", f"http://127.0.0.1:{server.server_port}/nothing.png")
        good, bad = [json.loads(line) for line in jsonl.stdout.strip().split("\n")]
        assert good["path"] == url + "&x=1" and good["caption"]
        with Image.open(tmp_path / "red_square_0.png") as pic:  # named after the URL's file name
            assert pic.text["capcli:caption"] == good["caption"]
        assert bad["path"] == f"http://127.0.0.1:{server.server_port}/nothing.png" and "404" in bad["error"]
    finally:
        server.shutdown()
        server.server_close()
