"""The encoder on OpenVINO: fp32 equal to PyTorch's and cached by content, int8 made by `capcli quantize`
and chosen by --precision auto only on CPUs with 8-bit dot products, and the clear lines when a
runtime or an int8 encoder is missing."""

from __future__ import annotations

import builtins
import logging

import pytest
import torch

from capcli.errors import CapcliError
from capcli.infer import encoding, openvino_encoder
from capcli.infer.captioner import Captioner
from capcli.model.files import load_model
from capcli.runtime import devices
from conftest import run_cli

pytest.importorskip("openvino")
pytestmark = pytest.mark.openvino
CPU = torch.device("cpu")


def shape_images(shapes_dir, n=None):
    return sorted(str(p) for p in (shapes_dir / "Images").glob("*.png"))[:n]


def pixels(loaded, paths):
    from capcli.data.images import image_to_tensor, load_image

    cfg = loaded.model.cfg
    return torch.stack([image_to_tensor(load_image(p), cfg.image_size, cfg.mean, cfg.std) for p in paths])


@pytest.fixture
def int8_file(trained_model, shapes_dir, tmp_path_factory):
    """The trained model's int8 encoder, made once per test session by the command users run."""
    key = openvino_encoder.encoder_key(load_model(trained_model).model, "word")
    found = openvino_encoder.find_encoder(key, "int8")
    if found:
        return found
    r = run_cli("-q", "quantize", "-m", str(trained_model), "--calibration", str(shapes_dir), "-n", "32")
    assert r.exit_code == 0, r.output
    assert r.stdout.strip().endswith(f"{key}-int8.xml")  # stdout: the path, nothing else
    return openvino_encoder.find_encoder(key, "int8")


def test_openvino_fp32_gives_pytorchs_features_and_is_cached_by_content(trained_model, shapes_dir, cache_dir,
                                                                         capcli_log, caplog):
    caplog.set_level(logging.DEBUG, "capcli")
    loaded = load_model(trained_model)
    x = pixels(loaded, shape_images(shapes_dir, 6))  # (6, 3, S, S)
    ov_encoder = encoding.choose_encoder(loaded.model, "word", CPU, "fp32", "openvino")
    assert isinstance(ov_encoder, openvino_encoder.OpenVinoEncoder) and ov_encoder.precision == "fp32"
    with torch.inference_mode():
        reference = loaded.model.encoder(x)  # (6, L, D)
    got = ov_encoder(x)
    assert got.shape == reference.shape and got.dtype == torch.float32
    assert torch.allclose(got, reference, atol=1e-4, rtol=1e-4)
    key = openvino_encoder.encoder_key(loaded.model, "word")
    cached = cache_dir / "encoders" / f"{key}-fp32.xml"
    assert cached.is_file() and cached.with_suffix(".bin").is_file()
    # another model object with the same encoder weights finds the cached file: no second conversion
    caplog.clear()
    again = encoding.choose_encoder(load_model(trained_model).model, "word", CPU, "fp32", "openvino")
    assert again.source == str(cached)
    assert not any("converting" in r.getMessage() for r in caplog.records)
    # the key is the content: the same weights under another domain, or other weights, are another encoder
    assert openvino_encoder.encoder_key(loaded.model, "smiles") != key
    with torch.no_grad():
        next(loaded.model.encoder.parameters()).add_(1e-3)
    assert openvino_encoder.encoder_key(loaded.model, "word") != key


def test_a_damaged_or_unwritable_cache_is_rebuilt_or_skipped_with_a_warning(trained_model, shapes_dir, tmp_path,
                                                                             monkeypatch, capcli_log, caplog):
    loaded = load_model(trained_model)
    x = pixels(loaded, shape_images(shapes_dir, 2))
    monkeypatch.setenv("CAPCLI_CACHE_DIR", str(tmp_path / "cache"))
    first = encoding.choose_encoder(loaded.model, "word", CPU, "fp32", "openvino")(x)
    encoding.choose_encoder(loaded.model, "word", CPU, "fp32", "openvino")  # a later run: compiled model reused
    xml = next((tmp_path / "cache" / "encoders").glob("*-fp32.xml"))
    xml.write_text("<net>not a model")
    (blob,) = (tmp_path / "cache" / "compiled").glob("*.blob")  # OpenVINO's compiled model, for the next cold start
    blob.chmod(0o644)
    blob.write_bytes(blob.read_bytes()[:1000])  # damaged too: compiled again
    again = encoding.choose_encoder(loaded.model, "word", CPU, "fp32", "openvino")
    assert torch.allclose(again(x), first, atol=1e-5)
    assert any("cannot be read" in w and "converting the encoder again" in w for w in
               [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING])
    assert xml.read_text().startswith("<?xml")  # rebuilt
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("CAPCLI_CACHE_DIR", str(blocker))  # a cache under a file cannot be written
    caplog.clear()
    assert torch.allclose(encoding.choose_encoder(loaded.model, "word", CPU, "fp32", "openvino")(x), first, atol=1e-5)
    assert any("cannot cache the OpenVINO encoder" in r.getMessage() for r in caplog.records)
    assert not any("compiled" in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def test_int8_captions_agree_with_fp32_on_most_images(trained_model, shapes_dir, int8_file):
    paths = shape_images(shapes_dir)
    fp32 = Captioner.load(trained_model, "cpu", "fp32", "torch")
    int8 = Captioner.load(trained_model, "cpu", "int8")
    assert int8.precision == "int8" and int8.encoder.source == str(int8_file)
    same = sum(a.tokens == b.tokens for a, b in zip(fp32.caption(paths, beam_size=3), int8.caption(paths, beam_size=3)))
    # the shapes model's beams are near ties between equally right captions (34 of 48 agreed here);
    # an encoder broken by quantization agrees on none
    assert same >= 0.6 * len(paths), f"{same} of {len(paths)}"
    x = pixels(fp32.loaded, paths[:8])
    reference = fp32.encode(x)
    assert ((int8.encode(x) - reference).norm() / reference.norm()) < 0.3


def test_evaluate_says_what_ran_the_encoder(trained_model, shapes_dir, int8_file, no_java):
    # the same model scores differently in int8, which auto picks on some CPUs: the scores say so
    import json

    base = ["evaluate", "--data", str(shapes_dir), "-m", str(trained_model), "--split", "val", "--device", "cpu"]
    for options, runtime, precision in ((["--runtime", "torch"], "torch", "fp32"),
                                        (["--precision", "fp32", "--runtime", "openvino"], "openvino", "fp32"),
                                        (["--precision", "int8"], "openvino", "int8")):
        r = run_cli(*base, *options, "--json")
        assert r.exit_code == 0, r.output
        scores = json.loads(r.stdout)
        assert (scores["runtime"], scores["precision"]) == (runtime, precision) and scores["BLEU-4"] >= 0
    table = run_cli(*base, "--precision", "int8")
    assert table.exit_code == 0 and "encoder int8 on openvino" in " ".join(table.stdout.split())  # a wrapped title


@pytest.mark.parametrize("has_dot, expected", [(True, "int8"), (False, "fp32")])
def test_auto_picks_int8_only_on_cpus_with_8_bit_dot_products(trained_model, int8_file, monkeypatch, capcli_log,
                                                              caplog, has_dot, expected):
    caplog.set_level(logging.INFO, "capcli")
    monkeypatch.setattr(encoding, "cpu_has_int8_dot", lambda: has_dot)
    monkeypatch.setattr(devices, "cpu_has_amx", lambda: False)
    cap = Captioner.load(trained_model, "cpu", "auto")
    assert cap.precision == expected
    notes = [r.getMessage() for r in caplog.records if "int8" in r.getMessage()]
    assert len(notes) == (1 if has_dot else 0)
    assert Captioner.load(trained_model, "cpu", "fp32").precision == "fp32"  # fp32 turns it off
    assert isinstance(Captioner.load(trained_model, "cpu", "auto", "torch").encoder, encoding.TorchEncoder)


def test_auto_keeps_pytorch_for_fewer_images_than_pay_for_starting_openvino(trained_model, int8_file, shapes_dir,
                                                                           monkeypatch):
    from capcli.infer import captioner as captioner_module

    monkeypatch.setattr(encoding, "cpu_has_int8_dot", lambda: True)  # not even int8 is worth starting for a few
    model = load_model(trained_model).model
    few, enough = encoding.OPENVINO_FROM_IMAGES - 1, encoding.OPENVINO_FROM_IMAGES
    assert isinstance(encoding.choose_encoder(model, "word", CPU, images=few), encoding.TorchEncoder)
    assert encoding.choose_encoder(model, "word", CPU, images=enough).precision == "int8"
    assert encoding.choose_encoder(model, "word", CPU).precision == "int8"  # how many is not known (stdin)
    for precision, runtime in (("fp32", "openvino"), ("int8", "auto")):  # asked for by name: always
        chosen = encoding.choose_encoder(model, "word", CPU, precision, runtime, images=1)
        assert isinstance(chosen, openvino_encoder.OpenVinoEncoder) and chosen.precision == precision
    # the command says how many images it has, or None when they stream from stdin
    counts, real = [], captioner_module.choose_encoder
    monkeypatch.setattr(captioner_module, "choose_encoder", lambda *a, **k: counts.append(k["images"]) or real(*a, **k))
    paths = shape_images(shapes_dir, 3)
    for args, stdin in (([*paths], None), (["-"], "\n".join(paths) + "\n")):
        r = run_cli("caption", "-m", str(trained_model), "--device", "cpu", *args, input=stdin)
        assert r.exit_code == 0 and len(r.stdout.splitlines()) == 3, r.stderr
    assert counts == [3, None]


def test_cpu_int8_detection_reads_the_cpus_flags(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: False, raising=False)
    monkeypatch.setattr(devices, "cpu_has_amx", lambda: False)
    flags = {"avx2": False, "avx2 avx_vnni": True, "avx512f amx_int8": True}
    real_open = builtins.open
    for line, expected in flags.items():
        info = tmp_path / "cpuinfo"
        info.write_text(f"processor\t: 0\nflags\t\t: fpu {line}\n")
        monkeypatch.setattr(builtins, "open", lambda f, *a, **k: real_open(info if f == "/proc/cpuinfo" else f, *a, **k))
        assert devices.cpu_has_int8_dot() is expected, line
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: True, raising=False)
    assert devices.cpu_has_int8_dot()


def test_without_an_int8_encoder_int8_is_one_line_naming_the_command(trained_model, tmp_path, monkeypatch):
    monkeypatch.setenv("CAPCLI_CACHE_DIR", str(tmp_path / "empty"))
    r = run_cli("caption", "-m", str(trained_model), "--precision", "int8", str(trained_model))
    assert r.exit_code == 2
    assert r.stderr == (f"capcli: {trained_model}: no int8 encoder for this model yet; make one with: "
                        f"capcli quantize {trained_model} --calibration IMAGE_DIR\n")


def test_a_missing_runtime_is_one_clear_line_and_auto_falls_back(trained_model, monkeypatch):
    real_import = builtins.__import__

    def no_openvino(name, *args, **kwargs):
        if name == "openvino" or name.startswith("openvino."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_openvino)
    loaded = load_model(trained_model)
    assert isinstance(encoding.choose_encoder(loaded.model, "word", CPU), encoding.TorchEncoder)
    for runtime, precision, said in (("openvino", "fp32", "--runtime openvino"), ("auto", "int8", "--precision int8")):
        with pytest.raises(CapcliError) as e:
            encoding.choose_encoder(loaded.model, "word", CPU, precision, runtime)
        assert str(e.value) == f"{said} needs OpenVINO, which is not installed: pip install openvino (or --runtime torch)"


def test_runtime_and_precision_combinations_that_cannot_run_are_refused(trained_model):
    loaded = load_model(trained_model)
    with pytest.raises(CapcliError, match=r"^--precision int8 runs on OpenVINO: use --runtime openvino"):
        encoding.choose_encoder(loaded.model, "word", CPU, "int8", "torch")
    with pytest.raises(CapcliError, match=r"^--runtime openvino runs the encoder on the CPU"):
        encoding.choose_encoder(loaded.model, "word", torch.device("cuda"), "fp32", "openvino")
    with pytest.raises(CapcliError, match=r"^--precision int8 runs the encoder on OpenVINO, on the CPU"):
        devices.resolve_precision("int8", torch.device("cuda"), ("auto", "int8"))
    with pytest.raises(CapcliError, match=r"^--precision 'int8': choose auto, fp32, bf16, fp16$"):
        devices.resolve_precision("int8", CPU)  # training has no int8


def test_quantize_refuses_a_folder_without_enough_images(trained_model, tmp_path):
    (tmp_path / "few").mkdir()
    r = run_cli("quantize", "-m", str(trained_model), "--calibration", str(tmp_path / "few"), "-o", str(tmp_path))
    assert r.exit_code == 2
    assert r.stderr.startswith("capcli: 0 readable calibration images; int8 calibration needs at least 8")
    r = run_cli("quantize", "-m", str(trained_model), "--calibration", str(tmp_path / "nothing"))
    assert r.exit_code == 2 and r.stderr == f"capcli: {tmp_path / 'nothing'}: not a folder of images\n"
