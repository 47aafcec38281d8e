"""The Python API: Captioner.caption takes one image (-> one result) or an iterable (-> a list)."""

from __future__ import annotations

from pathlib import Path

import pytest

from capcli.infer.captioner import Captioner, CaptionResult
from capcli.infer.decode import DecodeOptions


@pytest.fixture(scope="module")
def cap(trained_model) -> Captioner:
    return Captioner.load(trained_model, "cpu")


@pytest.fixture(scope="module")
def pics(shapes_dir) -> list[Path]:
    return sorted((shapes_dir / "Images").glob("*.png"))[::6][:4]  # one of each colour


def test_one_path_gives_one_result(cap, pics):
    for image in (str(pics[0]), pics[0]):
        result = cap.caption(image)
        assert isinstance(result, CaptionResult)
        assert result.ok and result.path == str(pics[0]) and result.caption
        assert result.tokens == result.caption.split()


def test_one_pil_image_gives_one_result_the_same_as_its_file(cap, pics):
    from PIL import Image

    with Image.open(pics[1]) as img:
        img.load()
        from_pil = cap.caption(img, beam_size=3)
    from_file = cap.caption(pics[1], beam_size=3)
    assert isinstance(from_pil, CaptionResult) and from_pil.path is None
    assert from_pil.caption == from_file.caption
    assert from_pil.score == pytest.approx(from_file.score, abs=1e-4)


@pytest.mark.parametrize("kind", [list, tuple, iter])
def test_an_iterable_gives_a_list_in_input_order(cap, pics, kind):
    from PIL import Image

    pil = Image.open(pics[2]).convert("RGB")
    mixed = [str(pics[0]), pil, pics[1], pics[3], pil]
    results = cap.caption(kind(mixed), batch_size=2)
    assert isinstance(results, list) and len(results) == 5
    assert [r.path for r in results] == [str(pics[0]), None, str(pics[1]), str(pics[3]), None]
    alone = [cap.caption(image).caption for image in mixed]
    assert [r.caption for r in results] == alone


def test_empty_iterable_gives_an_empty_list(cap):
    assert cap.caption([]) == []


def test_decode_options_by_keyword_or_object(cap, pics):
    by_keyword = cap.caption(pics[0], beam_size=3, nbest=2)
    by_object = cap.caption(pics[0], options=DecodeOptions(beam_size=3, nbest=2))
    assert len(by_keyword.alternatives) == 1
    assert (by_keyword.caption, by_keyword.alternatives[0].caption) == (by_object.caption, by_object.alternatives[0].caption)
    # Keywords change the options object, field by field.
    shorter = cap.caption(pics[0], options=DecodeOptions(beam_size=3, nbest=2), max_len=1)
    assert len(shorter.tokens) <= 1 and len(shorter.alternatives) == 1
    with pytest.raises(TypeError):
        cap.caption(pics[0], beam=3)


def test_unreadable_file_gives_a_result_with_the_error(cap, pics, tmp_path):
    missing = tmp_path / "missing.jpg"
    good, bad = cap.caption([pics[0], missing])
    assert good.ok
    assert not bad.ok and bad.path == str(missing) and bad.error == "no such file" and bad.caption == ""
    assert cap.caption(missing).error == "no such file"


@pytest.mark.parametrize("images,name", [(42, "int"), (None, "NoneType"), (b"photo.jpg", "bytes"),
                                         ([Path("a.jpg"), 3.5], "float"), ((x for x in [None]), "NoneType")])
def test_anything_else_is_a_type_error_naming_the_type(cap, images, name):
    with pytest.raises(TypeError, match=rf"^images must be .*, not {name}$"):
        cap.caption(images)
