"""Bad inputs never crash capcli: each gives its documented result, and no traceback reaches the user.

Every test builds its own bad files in tmp_path; the bad model files are made from the real one
that the session fixture ``trained_model`` trains (tests/conftest.py).

Documented behaviour, one row per case tested (E = one-line CapcliError naming the file, and
line where there is one; through the CLI exit 2 and one stderr line "capcli: ...").

 Images (load_image -> RGB PIL image, or ImageError; `capcli caption`/`beam` print
 "capcli: PATH: reason" on stderr for each bad one, caption the rest, and exit 1)
  zero-byte file                         ImageError "empty file"
  truncated JPEG (in the data or header) ImageError "truncated or corrupt image data"
  text file named .jpg                   ImageError "not an image (unrecognised format)"
  directory named .jpg                   ImageError "is a directory" (as a CLI argument it is a folder: searched)
  unreadable file (chmod 000)            ImageError "permission denied"
  missing file                           ImageError "no such file"
  dangling symlink                       ImageError "no such file"
  symlink loop (file link to itself)     ImageError "too many levels of symbolic links"
  symlink loop (folder link to parent)   folder walk ends; each real image found once
  PNG claiming 100000x100000 (bomb)      ImageError "image too large (100000x100000 pixels, more than the limit of ...)", nothing decoded
  corrupt data (bytes flipped, cut)      ImageError, never another exception
  1x1 image                              loaded (RGB 1x1), captioned
  4000x20 panorama                       loaded, captioned (squashed to the model's square)
  CMYK JPEG                              converted to RGB (red stays red)
  16-bit grayscale PNG (I;16)            scaled to 8 bits: full 0..255 range kept, not clipped white
  palette PNG with transparency          RGB, transparent pixels white
  RGBA PNG                               RGB, composited on white
  animated GIF                           first frame
  WebP                                   loaded as RGB
  EXIF orientation 6 JPEG                rotated: a 40x20 picture loads as 20x40

 Caption files (read_caption_table / load_dataset; CSV, TSV, JSONL)
  UTF-8 byte-order mark                  parsed (header recognised)
  CRLF line ends                         parsed, no stray CR in captions
  blank / whitespace-only lines          ignored (line numbers still count them)
  quoted commas, doubled quotes          parsed intact: "a dog, ""Rex"" runs" -> a dog, "Rex" runs
  quoted caption spanning two lines      parsed, whitespace collapsed to one space
  unquoted commas in the caption column  parsed: the rest of the line is the caption
  non-ASCII captions                     parsed intact, tokenized as words
  surrounding whitespace in fields       stripped (a quote after a comma and spaces still opens a quoted field)
  no header (first field an image name)  parsed as image,caption
  no header, first field not an image    E "FILE:1: no image and caption columns in the header (found: ...)"
  wrong column names                     E "FILE:1: no image and caption columns in the header (found: photo, label)"
  empty captions                         skipped, one warning "skipped N empty captions"
  every caption empty                    E "FILE: no usable captions (all are empty)"
  duplicate rows                         skipped, one warning "skipped N duplicate captions"
  images referenced but missing          skipped, one warning "skipped N captions of M images not found on disk"
  no referenced image on disk            E "FILE: no usable captions: none of the M images they name is on disk (looked for ...)"
  unknown split name ("holdout")         hash split, one warning naming the value; dev/validation -> val
  row with too few fields                E "FILE:LINE: expected 2 fields, found 1"
  extra fields before the last column    E "FILE:LINE: expected 3 fields, found 4 (quote fields that hold commas)"
  quote never closed                     E "FILE:LINE: malformed CSV (a quoted field is never closed)", LINE where it opens
  text after a closing quote             E "FILE:LINE: malformed CSV (',' expected after '"')"
  TSV caption starting with a quote      parsed literally (TSV has no quoting); a field wrapped in quotes is unwrapped
  not UTF-8 (Latin-1)                    E "FILE:LINE: not UTF-8 text"
  empty file / header only               E "FILE: no captions in the file"
  JSONL bad line / not an object / no    E "FILE:LINE: invalid JSON (...)" / "expected a JSON object per line" /
   caption field                           "no image and caption fields (found: ...)"
  missing file / a directory             E "FILE: no such file" / "FILE: is a directory, expected a caption file"

 Model files (checkpoint.load_model / read_metadata; `capcli caption --model FILE`: exit 2)
  missing file / a directory             E "no such file" / "is a directory, expected a .safetensors model file"
  zero bytes                             E "not a capcli model (empty or truncated file)"
  truncated in the tensor data           E "truncated model file (N bytes, expected M)"
  truncated in the header                E "not a capcli model (not a safetensors file, or truncated)"
  random bytes                           E "not a capcli model (not a safetensors file, or truncated)"
  pickled .pth (torch.save zip, pickle   E "is a pickled PyTorch file; ... never unpickles" (zip, protocol 2+) or
   protocols 0-5)                          "not a safetensors file" (protocol 0/1); NEVER unpickled (marker test)
  pickle given as encoder weights        E "cannot read weights (UnpicklingError ...)": torch.load(weights_only=True)
  safetensors from another program       E "a safetensors file, but not a capcli model (no capcli metadata)"
  newer capcli format version            E "capcli model format 2 is not supported by this capcli (needs 1)"
  header entry without data offsets      E "corrupt model file (a tensor entry of the header lacks its data offsets)"
  config not JSON / not an object        E "damaged capcli metadata (...)"
  config with an unknown encoder         E "unknown encoder 'bogus' (...)"
  config that does not fit the weights   E "weight NAME has shape (...), the config implies (...)"
  vocabulary size != config vocab_size   E "vocabulary has N words but the model expects M"
  metadata vocabulary not a vocabulary   E "vocabulary: vocabulary must start with <pad> <start> <end> <unk>" /
                                           "vocabulary: not a capcli vocabulary" / "damaged capcli metadata"
  built for another encoder              E "this model was built for the lite0 encoder, not resnet50"
  unreadable (chmod 000)                 E "permission denied"
 With --debug the CLI lets the exception through (a traceback) instead of the one line.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import struct
import zlib
from pathlib import Path

import pytest
from conftest import warnings_of
from typer.testing import CliRunner

from capcli.cli import app
from capcli.data.datasets import load_dataset
from capcli.data.images import ImageError, load_image
from capcli.data.listing import expand_paths
from capcli.data.tables import read_caption_table
from capcli.errors import CapcliError
from capcli.model.encoders import Encoder
from capcli.model.files import load_model, read_metadata
from capcli.text.vocab import tokenize

pytestmark = pytest.mark.usefixtures("capcli_log")  # caplog sees capcli's warnings


def one_line_error(excinfo, path: Path) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    assert message.startswith(f"{path}"), message
    return message[len(str(path)):]


def make_unreadable(path: Path, monkeypatch) -> None:
    """chmod 000 the file. Root reads it all the same; then opening it raises what the kernel
    gives everyone else, PermissionError (errno 13), from open() and os.open() themselves."""
    import builtins

    os.chmod(path, 0)
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        return
    real_open, real_os_open = builtins.open, os.open

    def refusing(real):
        def opening(file, *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and Path(file) == path:
                raise PermissionError(13, "Permission denied", str(file))
            return real(file, *args, **kwargs)
        return opening

    monkeypatch.setattr(builtins, "open", refusing(real_open))
    monkeypatch.setattr(os, "open", refusing(real_os_open))


# =========================================================================== images

def save(img, path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def rgb(size=(24, 16), colour=(200, 30, 30)):
    from PIL import Image

    return Image.new("RGB", size, colour)


def jpeg_bytes(size=(64, 48)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.effect_mandelbrot(size, (-2, -1.5, 1, 1.5), 40).convert("RGB").save(buf, "JPEG")
    return buf.getvalue()


def bomb_png(path: Path, width=100_000, height=100_000) -> Path:
    """A real 8x8 PNG whose IHDR (with a correct CRC) claims width x height pixels."""
    buf = io.BytesIO()
    rgb((8, 8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def good_images(d: Path) -> dict[str, Path]:
    from PIL import Image

    out = {
        "one.png": save(rgb((1, 1), (10, 200, 10)), d / "one.png"),
        "panorama.jpg": save(rgb((4000, 20), (20, 20, 220)), d / "panorama.jpg"),
        "cmyk.jpg": save(Image.new("CMYK", (30, 20), (0, 255, 255, 0)), d / "cmyk.jpg"),
        "webp.webp": save(rgb((30, 20), (5, 5, 200)), d / "webp.webp"),
    }
    g16 = Image.new("I;16", (16, 16))
    g16.putdata([v * 257 for v in range(256)])  # 0..65535
    out["g16.png"] = save(g16, d / "g16.png")
    pal = Image.new("P", (10, 10), 0)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.paste(1, (5, 0, 10, 10))  # left half index 0 (transparent red), right half blue
    out["palette.png"] = save(pal, d / "palette.png", transparency=0)
    rgba = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    rgba.paste((0, 200, 0, 255), (0, 0, 5, 10))
    out["rgba.png"] = save(rgba, d / "rgba.png")
    frames = [rgb((20, 10), (255, 0, 0)), rgb((20, 10), (0, 0, 255))]
    out["anim.gif"] = save(frames[0], d / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    out["exif6.jpg"] = save(rgb((40, 20), (200, 200, 0)), d / "exif6.jpg", exif=exif)
    return out


def bad_images(d: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path, the reason load_image must give)."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "zero.jpg").write_bytes(b"")
    data = jpeg_bytes()
    (d / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (d / "cut-header.jpg").write_bytes(data[:40])
    (d / "text.jpg").write_text("this is not a picture, just text\n")
    (d / "folder.jpg").mkdir()
    bomb_png(d / "bomb.png")
    os.symlink("selfloop.jpg", d / "selfloop.jpg")
    os.symlink("nowhere.jpg", d / "dangling.jpg")
    return {
        "zero.jpg": (d / "zero.jpg", "empty file"),
        "truncated.jpg": (d / "truncated.jpg", "truncated or corrupt image data"),
        "cut-header.jpg": (d / "cut-header.jpg", "truncated or corrupt image data"),
        "text.jpg": (d / "text.jpg", "not an image (unrecognised format)"),
        "folder.jpg": (d / "folder.jpg", "is a directory"),
        "bomb.png": (d / "bomb.png", "image too large (100000x100000 pixels, more than the limit of 178956970; "
                                     "see --max-image-pixels)"),
        "selfloop.jpg": (d / "selfloop.jpg", "too many levels of symbolic links"),
        "dangling.jpg": (d / "dangling.jpg", "no such file"),
        "missing.jpg": (d / "missing.jpg", "no such file"),
    }


def test_bad_images_raise_image_error_with_a_one_line_reason(tmp_path):
    for name, (path, reason) in bad_images(tmp_path).items():
        with pytest.raises(ImageError) as e:
            load_image(path, draft_size=64)
        assert str(e.value) == reason, name


def test_unreadable_image(tmp_path, monkeypatch):
    path = save(rgb(), tmp_path / "secret.png")
    make_unreadable(path, monkeypatch)
    with pytest.raises(ImageError, match="^permission denied$"):
        load_image(path)


def test_bomb_is_refused_before_decoding(tmp_path, monkeypatch):
    from PIL import ImageFile

    def no_decoding(self, *a, **k):
        raise AssertionError("a bomb must not be decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ImageError, match="too large"):
        load_image(bomb_png(tmp_path / "bomb.png"))
    # Pillow refuses this one itself; capcli reads its size unchecked, and refuses it, not decoded either.
    with pytest.raises(ImageError, match="too large"):
        load_image(bomb_png(tmp_path / "big.png", 20_000, 10_000))


def test_corrupt_image_data_only_ever_raises_image_error(tmp_path):
    from PIL import Image

    rng = random.Random(1)
    base = Image.effect_mandelbrot((48, 32), (-2, -1.5, 1, 1.5), 30).convert("RGB")
    failures = 0
    for fmt in ("JPEG", "PNG", "GIF", "WEBP", "BMP"):
        buf = io.BytesIO()
        base.save(buf, fmt)
        data = buf.getvalue()
        for k in range(12):
            blob = bytearray(data[: rng.randrange(1, len(data))] if k % 2 else data)
            for _ in range(4 if k % 2 == 0 else 0):
                blob[rng.randrange(len(blob))] = rng.randrange(256)
            path = tmp_path / f"c{k}.{fmt.lower()}"
            path.write_bytes(bytes(blob))
            try:
                img = load_image(path, draft_size=32)
            except ImageError as e:
                failures += 1
                assert str(e) and "\n" not in str(e)
            else:
                assert img.mode == "RGB"
    assert failures >= 20  # the corpus really is bad


def test_odd_but_good_images_load_as_rgb(tmp_path):
    imgs = {name: load_image(path, draft_size=64) for name, path in good_images(tmp_path).items()}
    assert all(img.mode == "RGB" for img in imgs.values())
    assert imgs["one.png"].size == (1, 1) and imgs["one.png"].getpixel((0, 0)) == (10, 200, 10)
    assert imgs["panorama.jpg"].size == (4000, 20)
    r, g, b = imgs["cmyk.jpg"].getpixel((5, 5))
    assert r > 200 and g < 60 and b < 60  # CMYK (0,255,255,0) is red
    assert max(abs(x - y) for x, y in zip(imgs["webp.webp"].getpixel((3, 3)), (5, 5, 200))) < 12
    # 16-bit: scaled, not clipped (clipping would make all but the first pixel white).
    g16 = imgs["g16.png"].convert("L")
    assert g16.getextrema() == (0, 255)
    row = [g16.getpixel((x, 8)) for x in range(16)]
    assert row == sorted(row) and len(set(row)) == 16  # the ramp survives: distinct, increasing
    assert imgs["palette.png"].getpixel((1, 1)) == (255, 255, 255)  # transparent -> white
    assert imgs["palette.png"].getpixel((8, 1)) == (0, 0, 255)
    assert imgs["rgba.png"].getpixel((1, 1)) == (0, 200, 0)
    assert imgs["rgba.png"].getpixel((8, 1)) == (255, 255, 255)
    assert imgs["anim.gif"].getpixel((1, 1)) == (255, 0, 0)  # first frame, not the blue second
    assert imgs["exif6.jpg"].size == (20, 40)  # EXIF orientation applied


def test_folder_walk_ends_on_symlink_loops(tmp_path):
    d = tmp_path / "photos"
    save(rgb(), d / "a.png")
    save(rgb(), d / "sub" / "b.jpg")
    (d / "notes.txt").write_text("not an image")
    os.symlink("..", d / "sub" / "up")  # a folder loop: sub/up/sub/up/...
    os.symlink("self.jpg", d / "self.jpg")  # a file loop
    found = list(expand_paths([str(d)]))
    assert sorted(Path(p).name for p in found) == ["a.png", "b.jpg", "self.jpg"]
    assert found == sorted(found)


# --------------------------------------------------------------------------- images through the CLI

def test_caption_reports_bad_images_and_captions_the_rest(tmp_path, trained_model):
    good = good_images(tmp_path / "good")
    bad = bad_images(tmp_path / "bad")
    args = [str(p) for p in good.values()] + [str(p) for p, _ in bad.values()]
    result = CliRunner().invoke(app, ["caption", "--model", str(trained_model), "--device", "cpu", "--format", "tsv", *args])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    out = [line.split("\t") for line in result.stdout.splitlines()]
    assert [p for p, _ in out] == [str(p) for p in good.values()]  # every good one, in order
    assert all(c.strip() for _, c in out)
    errors = result.stderr.splitlines()
    # A directory given as an argument is a folder to search, whatever its name: folder.jpg is
    # empty, so it adds no image and no error.
    folder, _ = bad.pop("folder.jpg")
    assert not any(str(folder) in line for line in errors)
    for path, reason in bad.values():
        assert f"capcli: {path}: {reason}" in errors
    assert errors[-1] == f"capcli: warning: {len(bad)} of {len(good) + len(bad)} images could not be read"
    assert len(errors) == len(bad) + 1


def test_beam_over_a_folder_with_loops_and_junk(tmp_path, trained_model):
    d = tmp_path / "album"
    save(rgb((30, 30), (220, 30, 30)), d / "red.png")
    save(rgb((4000, 20)), d / "wide" / "pano.png")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    (d / "readme.txt").write_text("skipped: not an image suffix")
    os.symlink("..", d / "wide" / "loop")
    result = CliRunner().invoke(app, ["beam", "-k", "2", "--model", str(trained_model), "--device", "cpu",
                                      "--format", "jsonl", str(d)])
    assert result.exit_code == 1, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [Path(r["path"]).name for r in rows] == ["broken.jpg", "red.png", "pano.png"]
    assert rows[0]["error"] == "truncated or corrupt image data"  # starts like a JPEG, then junk
    assert rows[1]["caption"] and rows[2]["caption"]
    assert result.stderr.splitlines()[0] == f"capcli: {d / 'broken.jpg'}: truncated or corrupt image data"


def test_caption_of_only_good_odd_images_exits_0(tmp_path, trained_model):
    good = good_images(tmp_path)
    result = CliRunner().invoke(app, ["caption", "--model", str(trained_model), "--device", "cpu", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert len(lines) == len(good) and all(lines)


# =========================================================================== caption files

def write(path: Path, text: str, encoding="utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


@pytest.fixture
def pics(tmp_path) -> Path:
    d = tmp_path / "pics"
    for name in ("a.jpg", "b.jpg", "c.jpg", "é.jpg"):
        save(rgb((4, 4)), d / name)
    return d


def load(path: Path, images: Path):
    return {s.image.name: s for s in load_dataset(captions_file=path, images_dir=images).samples}


def test_bom_crlf_blank_lines_quotes_and_whitespace(tmp_path, pics):
    text = ('\ufeffimage,caption\r\n\r\n   \r\n a.jpg ,  "A dog, ""Rex"", runs."\r\n'
            'b.jpg,"two\r\nlines"\r\n,\r\nc.jpg, plain \r\n\r\n')
    s = load(write(tmp_path / "c.csv", text), pics)
    assert s["a.jpg"].captions == ('A dog, "Rex", runs.',)
    assert s["b.jpg"].captions == ("two lines",)
    assert s["c.jpg"].captions == ("plain",)
    assert not any("\r" in c for x in s.values() for c in x.captions)


def test_non_ascii_captions(tmp_path, pics):
    s = load(write(tmp_path / "c.csv", "image,caption\né.jpg,Un garçon mange une crème brûlée 🍮\na.jpg,日本の犬\n"), pics)
    assert s["é.jpg"].captions == ("Un garçon mange une crème brûlée 🍮",)
    assert tokenize(s["é.jpg"].captions[0]) == ["un", "garçon", "mange", "une", "crème", "brûlée"]
    assert s["a.jpg"].captions == ("日本の犬",)


def test_no_header(tmp_path, pics):
    s = load(write(tmp_path / "c.csv", "a.jpg,first\nb.jpg,second\n"), pics)
    assert s["a.jpg"].captions == ("first",) and s["b.jpg"].captions == ("second",)
    tsv = write(tmp_path / "c.tsv", "a.jpg\t\"Quoted\" at the start\nb.jpg\t\"wrapped, in quotes\"\n")
    s = load(tsv, pics)
    assert s["a.jpg"].captions == ('"Quoted" at the start',)
    assert s["b.jpg"].captions == ("wrapped, in quotes",)


def test_unquoted_commas_in_the_caption_column(tmp_path, pics):
    s = load(write(tmp_path / "c.csv", "image,caption\na.jpg,a dog, a cat, and a bird\n"), pics)
    assert s["a.jpg"].captions == ("a dog, a cat, and a bird",)


def test_empty_and_duplicate_captions_are_skipped_with_counting_warnings(tmp_path, pics, caplog):
    text = 'image,caption\na.jpg,\na.jpg,"   "\na.jpg,a dog\na.jpg,a dog\na.jpg,a  dog \nb.jpg,x\nb.jpg,x\n'
    path = write(tmp_path / "c.csv", text)
    s = load(path, pics)
    assert s["a.jpg"].captions == ("a dog",) and s["b.jpg"].captions == ("x",)
    assert warnings_of(caplog) == [f"{path}: skipped 2 empty captions", f"{path}: skipped 3 duplicate captions"]


def test_all_captions_empty_is_an_error(tmp_path, pics):
    path = write(tmp_path / "c.csv", "image,caption\na.jpg,\nb.jpg,  \n")
    with pytest.raises(CapcliError) as e:
        load(path, pics)
    assert one_line_error(e, path) == ": no usable captions (all are empty)"


def test_missing_images_warning_and_error(tmp_path, pics, caplog):
    path = write(tmp_path / "c.csv", "image,caption\na.jpg,ok\nzz.jpg,gone\nzz.jpg,gone again\nyy.jpg,gone too\n")
    assert list(load(path, pics)) == ["a.jpg"]
    assert warnings_of(caplog) == [f"{path}: skipped 3 captions of 2 images not found on disk"]
    path = write(tmp_path / "d.csv", "image,caption\nzz.jpg,gone\n")
    with pytest.raises(CapcliError) as e:
        load(path, pics)
    assert one_line_error(e, path) == (f": no usable captions: none of the 1 images they name is on disk (looked for "
                                       f"{pics / 'zz.jpg'} and the others in {pics}; --images DIR says where they are)")


def test_unknown_split_names(tmp_path, pics, caplog):
    path = write(tmp_path / "c.csv", "image,caption,split\na.jpg,x,holdout\nb.jpg,y,dev\nc.jpg,z,TRAIN\n")
    s = load(path, pics)
    assert s["b.jpg"].split == "val" and s["c.jpg"].split == "train"
    from capcli.data.splits import hash_split

    assert s["a.jpg"].split == hash_split("a.jpg")
    assert warnings_of(caplog) == [f"{path}: 1 image with an unknown split ('holdout') split by name hash instead"]


@pytest.mark.parametrize("name,text,where,message", [
    ("wrong-columns.csv", "photo,label\na.jpg,x\n", 1, "no image and caption columns in the header (found: photo, label); expected e.g. 'image,caption'"),
    ("no-header-no-image.csv", "\n\nhello,world\n", 3, "no image and caption columns in the header (found: hello, world); expected e.g. 'image,caption'"),
    ("short-row.csv", "image,caption\na.jpg,x\nb.jpg\n", 3, "expected 2 fields, found 1"),
    ("extra-fields.csv", "image,caption,split\na.jpg,a, b,train\n", 2, "expected 3 fields, found 4 (quote fields that hold commas)"),
    ("unclosed-quote.csv", 'image,caption\na.jpg,ok\nb.jpg,"never closed\nc.jpg,swallowed\nc.jpg,too\n', 3, "malformed CSV (a quoted field is never closed)"),
    ("after-quote.csv", 'image,caption\n\na.jpg,"quoted" then text\n', 3, "malformed CSV (',' expected after '\"')"),
    ("bad.jsonl", '{"image": "a.jpg", "caption": "x"}\n{"image": "b.jpg", \n', 2, "invalid JSON (Expecting property name enclosed in double quotes)"),
    ("list.jsonl", '["a.jpg", "x"]\n', 1, "expected a JSON object per line"),
    ("fields.jsonl", '\n{"img": "a.jpg", "label": "x"}\n', 2, "no image and caption fields (found: img, label); expected e.g. {\"image\": ..., \"caption\": ...}"),
])
def test_malformed_caption_files_name_file_and_line(tmp_path, pics, name, text, where, message):
    path = write(tmp_path / name, text)
    with pytest.raises(CapcliError) as e:
        load(path, pics)
    assert one_line_error(e, path) == f":{where}: {message}"


def test_latin1_file_names_the_first_bad_line(tmp_path, pics):
    path = write(tmp_path / "latin1.csv", "image,caption\na.jpg,fine\nb.jpg,un garçon\n", encoding="latin-1")
    with pytest.raises(CapcliError) as e:
        load(path, pics)
    assert one_line_error(e, path) == ":3: not UTF-8 text"


@pytest.mark.parametrize("text", ["", "\n\n", "\ufeffimage,caption\r\n", "image,caption\n\n"])
def test_empty_or_header_only_file(tmp_path, pics, text):
    path = write(tmp_path / "c.csv", text)
    with pytest.raises(CapcliError) as e:
        load(path, pics)
    assert one_line_error(e, path) == ": no captions in the file"


def test_caption_file_missing_or_a_directory(tmp_path, pics):
    with pytest.raises(CapcliError) as e:
        read_caption_table(tmp_path / "nope.csv")
    assert one_line_error(e, tmp_path / "nope.csv") == ": no such file"
    (tmp_path / "dir.csv").mkdir()
    with pytest.raises(CapcliError) as e:
        read_caption_table(tmp_path / "dir.csv")
    assert one_line_error(e, tmp_path / "dir.csv") == ": is a directory, expected a caption file"


def test_caption_file_errors_and_warnings_through_the_cli(tmp_path, pics):
    bad = write(tmp_path / "bad.csv", 'image,caption\na.jpg,"open\n')
    result = CliRunner().invoke(app, ["build-vocab", "--captions", str(bad), "--images", str(pics), "-o", str(tmp_path / "v.json")])
    assert result.exit_code == 2
    assert result.stderr == f"capcli: {bad}:2: malformed CSV (a quoted field is never closed)\n"
    assert "Traceback" not in result.output
    ok = write(tmp_path / "ok.csv", "\ufeffimage,caption\r\na.jpg,a dog\r\na.jpg,\r\nzz.jpg,gone\r\n")
    result = CliRunner().invoke(app, ["build-vocab", "--captions", str(ok), "--images", str(pics), "--min-freq", "1",
                                      "--split", "100/0/0", "-o", str(tmp_path / "v.json")])
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [f"capcli: warning: {ok}: skipped 1 empty caption",
                                          f"capcli: warning: {ok}: skipped 1 caption of 1 image not found on disk",
                                          "capcli: data: caption file ok.csv; split from hash 100/0/0 of image names; 1 image: "
                                          "train 1, val 0, test 0; dropped 1 empty caption, 1 caption of 1 image not found on disk"]
    assert json.loads((tmp_path / "v.json").read_text())["words"][4:] == ["a", "dog"]


# =========================================================================== model files

def read_header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_header(path: Path, header: dict, body: bytes) -> Path:
    data = json.dumps(header).encode()
    data += b" " * (-len(data) % 8)
    path.write_bytes(struct.pack("<Q", len(data)) + data + body)
    return path


def with_metadata(src: Path, dst: Path, **changes) -> Path:
    """A copy of the model file with metadata entries changed (None: removed), tensors untouched."""
    header, body = read_header(src)
    meta = header["__metadata__"]
    for k, v in changes.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v if isinstance(v, str) else json.dumps(v)
    return write_header(dst, header, body)


class Marker:
    """Unpickling this creates the file at ``path``: proof that something ran pickle's code."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def bad_models(src: Path, d: Path) -> dict[str, tuple[Path, str]]:
    """name -> (bad model file, the message after 'PATH: ')."""
    import torch
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    raw = src.read_bytes()
    header, body = read_header(src)
    meta = header["__metadata__"]
    cfg, vocab = json.loads(meta["config"]), json.loads(meta["vocab"])
    out = {}

    def add(name, path, message):
        out[name] = (path, message)

    (d / "dir.safetensors").mkdir()
    add("directory", d / "dir.safetensors", "is a directory, expected a .safetensors model file")
    add("missing", d / "missing.safetensors", "no such file")
    (d / "zero.safetensors").write_bytes(b"")
    add("zero bytes", d / "zero.safetensors", "not a capcli model (empty or truncated file)")
    (d / "cut.safetensors").write_bytes(raw[: len(raw) * 2 // 3])
    add("truncated data", d / "cut.safetensors", f"truncated model file ({len(raw) * 2 // 3} bytes, expected {len(raw)})")
    (d / "cut-header.safetensors").write_bytes(raw[:200])
    add("truncated header", d / "cut-header.safetensors", "not a capcli model (not a safetensors file, or truncated)")
    (d / "random.safetensors").write_bytes(random.Random(7).randbytes(5000))
    add("random bytes", d / "random.safetensors", "not a capcli model (not a safetensors file, or truncated)")
    save_file({"weight": torch.zeros(2, 2)}, str(d / "foreign.safetensors"), metadata={"format": "pt"})
    add("foreign safetensors", d / "foreign.safetensors", "a safetensors file, but not a capcli model (no capcli metadata)")
    save_file({"weight": torch.zeros(2, 2)}, str(d / "plain.safetensors"))
    add("plain safetensors", d / "plain.safetensors", "a safetensors file, but not a capcli model (no capcli metadata)")
    add("format 2", with_metadata(src, d / "v2.safetensors", format_version="2"),
        "capcli model format 2 is not supported by this capcli (needs 1)")
    broken = json.loads(json.dumps(header))
    name = next(k for k in broken if k != "__metadata__")
    del broken[name]["data_offsets"]
    add("no data offsets", write_header(d / "offsets.safetensors", broken, body),
        "corrupt model file (a tensor entry of the header lacks its data offsets)")
    add("config not JSON", with_metadata(src, d / "cfg-json.safetensors", config="{nope"),
        "damaged capcli metadata (config: invalid JSON (Expecting property name enclosed in double quotes))")
    add("config a list", with_metadata(src, d / "cfg-list.safetensors", config=[1, 2]),
        "damaged capcli metadata (config is not a JSON object)")
    add("config missing", with_metadata(src, d / "cfg-none.safetensors", config=None),
        "damaged capcli metadata (no config)")
    add("unknown encoder", with_metadata(src, d / "cfg-enc.safetensors", config={**cfg, "encoder": "bogus"}),
        "unknown encoder 'bogus' (choose lite0, lite1, lite2, resnet50, resnet101, resnet152 or timm:NAME)")
    wrong = {**cfg, "decoder_dim": cfg["decoder_dim"] * 2}
    add("config does not fit", with_metadata(src, d / "cfg-dim.safetensors", config=wrong), "weight decoder.")
    short = {**vocab, "words": vocab["words"][:-1]}
    add("vocab size", with_metadata(src, d / "vocab-size.safetensors", vocab=short),
        f"vocabulary has {len(vocab['words']) - 1} words but the model expects {cfg['vocab_size']}")
    reordered = {**vocab, "words": vocab["words"][4:] + vocab["words"][:4]}
    add("vocab order", with_metadata(src, d / "vocab-order.safetensors", vocab=reordered),
        "vocabulary: vocabulary must start with <pad> <start> <end> <unk>")
    add("vocab not a vocab", with_metadata(src, d / "vocab-list.safetensors", vocab=[1, 2, 3]),
        "vocabulary: not a capcli vocabulary (expected JSON with a 'words' list)")
    add("vocab not JSON", with_metadata(src, d / "vocab-json.safetensors", vocab="<pad> <start>"),
        "damaged capcli metadata (vocab: invalid JSON (Expecting value))")
    marker = d / "UNPICKLED"
    torch.save({"state_dict": Marker(marker)}, d / "zip.pth")
    add("torch.save zip pickle", d / "zip.pth", "is a pickled PyTorch file; capcli only loads .safetensors model files "
        "and never unpickles (convert it with the tool that made it)")
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        path = d / f"p{protocol}.pth"
        path.write_bytes(pickle.dumps({"weights": Marker(marker)}, protocol=protocol))
        add(f"pickle protocol {protocol}", path,
            "not a capcli model (not a safetensors file, or truncated)" if protocol < 2 else out["torch.save zip pickle"][1])
    return out


@pytest.fixture(scope="module")
def models(trained_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("bad-models")
    return d, bad_models(trained_model, d)


def test_bad_model_files_give_one_line_errors(models):
    d, cases = models
    for name, (path, message) in cases.items():
        with pytest.raises(CapcliError) as e:
            load_model(path)
        got = one_line_error(e, path)
        assert got.startswith(f": {message}"), (name, got)
        assert e.value.exit_code == 2
    assert not (d / "UNPICKLED").exists()


def test_read_metadata_refuses_without_reading_weights(models, trained_model):
    d, cases = models
    assert read_metadata(trained_model)["format"] == "capcli-model"
    for name in ("torch.save zip pickle", "pickle protocol 0", "plain safetensors", "truncated data"):
        path, message = cases[name]
        with pytest.raises(CapcliError, match="^" + str(path).replace(".", r"\.") + ": "):
            read_metadata(path)
    assert not (d / "UNPICKLED").exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_pickles_as_encoder_weights_are_not_executed(models):
    d, cases = models
    for name in ("torch.save zip pickle", "pickle protocol 2", "pickle protocol 5"):
        path, _ = cases[name]
        with pytest.raises(CapcliError) as e:
            Encoder("lite0").load_pretrained(path)
        assert one_line_error(e, path).startswith(": cannot read weights (UnpicklingError"), name
    assert not (d / "UNPICKLED").exists()


def test_model_for_another_encoder(trained_model):
    with pytest.raises(CapcliError) as e:
        load_model(trained_model, encoder="resnet50")
    assert one_line_error(e, trained_model) == ": this model was built for the lite0 encoder, not resnet50"
    assert load_model(trained_model, encoder="lite0").model.cfg.encoder == "lite0"


def test_unreadable_model(trained_model, tmp_path, monkeypatch):
    path = tmp_path / "locked.safetensors"
    path.write_bytes(trained_model.read_bytes())
    make_unreadable(path, monkeypatch)
    with pytest.raises(CapcliError) as e:
        load_model(path)
    assert one_line_error(e, path) == ": permission denied"


def test_damaged_training_record_does_not_stop_the_model(trained_model, tmp_path):
    path = with_metadata(trained_model, tmp_path / "m.safetensors", training="{not json")
    loaded = load_model(path)
    assert loaded.training == {} and len(loaded.vocab) == loaded.model.cfg.vocab_size


CLI_MODEL_CASES = ["directory", "missing", "zero bytes", "truncated data", "random bytes", "torch.save zip pickle",
                   "pickle protocol 0", "plain safetensors", "format 2", "no data offsets", "config a list",
                   "unknown encoder", "config does not fit", "vocab size", "vocab order"]


def test_bad_models_through_the_cli(models, tmp_path):
    d, cases = models
    image = save(rgb(), tmp_path / "photo.png")
    for name in CLI_MODEL_CASES:
        path, message = cases[name]
        result = CliRunner().invoke(app, ["caption", "--model", str(path), "--device", "cpu", str(image)])
        assert result.exit_code == 2, (name, result.output)
        assert result.stdout == "", name
        assert result.stderr.startswith(f"capcli: {path}: {message}"), (name, result.stderr)
        assert len(result.stderr.splitlines()) == 1, (name, result.stderr)
        assert "Traceback" not in result.output
    assert not (d / "UNPICKLED").exists()


def test_debug_shows_the_exception(models, tmp_path):
    d, cases = models
    path, _ = cases["random bytes"]
    image = save(rgb(), tmp_path / "photo.png")
    result = CliRunner().invoke(app, ["--debug", "caption", "--model", str(path), "--device", "cpu", str(image)])
    assert result.exit_code == 2  # the exit code of the error, as without --debug
    assert "Traceback (most recent call last)" in result.stderr and "CapcliError" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"capcli: {path}: ")
