"""Captioning throughput, start-up time and memory for each encoder runtime, side by side in one run.

    python bench/bench_caption.py [--model FILE] [--images DIR] [-n 200]

The encoders compared: PyTorch fp32 (capcli before OpenVINO), PyTorch at the automatic precision
where that differs (bf16 on AMX CPUs), OpenVINO fp32, and OpenVINO int8 where this model has an
int8 encoder (shipped, or `capcli quantize`). Prints one line per figure:
  encoder-only          images/s of the encoder alone on images already decoded and resized
  pipeline beam 1 / 3   images/s of Captioner.caption_stream over the image files (decode + encode + search)
  stages                ms per image of decoding (Pillow, the pipeline's threads), encoding and the
                        search (greedy and beam 3) measured apart
  (all of these: medians of --repeat interleaved runs, with their spread)
  one-at-a-time loop    images/s captioning one image per call, model loaded once (beam 3, default encoder)
  ratios                each encoder and pipeline / PyTorch fp32's
  cold start            wall seconds of `capcli caption` in a fresh process on 1 to 128 images, per
                        runtime, auto included (medians of --repeat; OpenVINO's converted encoder cached)
  peak memory           max RSS of `capcli beam` over 1000 image paths (streamed from stdin), per runtime
On a GPU (--device cuda) only PyTorch runs the encoder.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MINI = ROOT.parent / "shared" / "data" / "flickr8k-mini" / "Images"


def line(name: str, value: float, unit: str, extra: str = "") -> None:
    print(f"{name:<34} {value:10.2f} {unit}{'  ' + extra if extra else ''}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model file (default: the shipped model)")
    ap.add_argument("--images", type=Path, default=MINI, help="folder of images (default: flickr8k-mini)")
    ap.add_argument("-n", type=int, default=200, help="images per throughput measurement")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3, help="interleaved repetitions of the throughput figures (medians reported)")
    ap.add_argument("--skip-process", action="store_true", help="skip the cold-start and memory figures")
    ap.add_argument("--cold-sizes", type=lambda v: [int(x) for x in v.split(",")], default=[1, 32, 64, 128],
                    help="images per cold-start run (comma-separated)")
    args = ap.parse_args()

    import torch

    from capcli.cli import keep_freed_memory
    from capcli.data.images import image_batches, image_to_tensor, load_image
    from capcli.infer.captioner import Captioner, default_model_path
    from capcli.infer.decode import DecodeOptions
    from capcli.infer.encoding import choose_encoder
    from capcli.infer.openvino_encoder import encoder_key, find_encoder, openvino_available

    keep_freed_memory()  # as the capcli command does

    model_path = Path(args.model) if args.model else default_model_path()
    paths = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[: args.n]
    if not paths:
        sys.exit(f"no images in {args.images}")
    default = Captioner.load(model_path, args.device)  # what capcli runs: --precision auto --runtime auto
    loaded, device = default.loaded, default.device
    model, tokenizer = loaded.model, loaded.vocab.tokenizer
    # (runtime, precision) of each encoder compared; "torch fp32" is capcli before OpenVINO
    chosen = [("torch", "fp32")]
    torch_auto = choose_encoder(model, tokenizer, device, "auto", "torch").precision
    if torch_auto != "fp32":
        chosen.append(("torch", torch_auto))
    if device.type == "cpu" and openvino_available():
        chosen.append(("openvino", "fp32"))
        if find_encoder(encoder_key(model, tokenizer), "int8"):
            chosen.append(("openvino", "int8"))
    captioners = {f"{r} {p}": Captioner(loaded, device, encoder=choose_encoder(model, tokenizer, device, p, r))
                  for r, p in chosen}
    default_name = f"{'openvino' if type(default.encoder).__name__ == 'OpenVinoEncoder' else 'torch'} {default.precision}"
    print(f"# {len(paths)} images from {args.images}, model {model_path.name}, device {device}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch_size}; "
          f"encoders: {', '.join(captioners)}; the default (auto): {default_name}", flush=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn, n: int) -> float:
        """images/s of fn() over n images"""
        sync()
        t = time.perf_counter()
        fn()
        sync()
        return n / (time.perf_counter() - t)

    cfg = default.cfg
    x = torch.stack([image_to_tensor(load_image(p), cfg.image_size, cfg.mean, cfg.std) for p in paths]).to(device)
    features = default.encode(x)  # (N, L, D), for timing the search alone

    def decode_images() -> None:  # the pipeline's image threads, nothing else
        for _ in image_batches(paths, cfg.image_size, args.batch_size, 2, overlap=False):
            pass

    def search(k: int) -> None:
        for i in range(0, len(features), args.batch_size):
            default.decode(features[i:i + args.batch_size], DecodeOptions(beam_size=k))

    # This machine's speed wanders by +-20% from one second to the next, so the measurements are
    # interleaved, repeated, and the medians compared.
    few = paths[: max(20, len(paths) // 4)]
    for c in captioners.values():
        list(c.caption_stream(paths[:16], DecodeOptions(beam_size=1), batch_size=args.batch_size))  # warm-up
    list(default.caption_stream(paths, DecodeOptions(beam_size=1), batch_size=args.batch_size))  # files in the page cache
    runs: dict[str, list[float]] = {}
    for _ in range(args.repeat):
        for name, c in captioners.items():
            runs.setdefault(f"encoder {name}", []).append(timed(lambda: c.encode(x), len(x)))
            for k in (1, 3):
                runs.setdefault(f"beam {k} {name}", []).append(
                    timed(lambda: list(c.caption_stream(paths, DecodeOptions(beam_size=k), batch_size=args.batch_size)), len(paths)))
        runs.setdefault("decode", []).append(timed(decode_images, len(paths)))
        for k in (1, 3):
            runs.setdefault(f"search {k}", []).append(timed(lambda: search(k), len(paths)))
        runs.setdefault("loop", []).append(timed(lambda: [default.caption([p], beam_size=3) for p in few], len(few)))
    median = {key: statistics.median(v) for key, v in runs.items()}

    def spread(key: str) -> str:
        return f"min {min(runs[key]):.1f}, max {max(runs[key]):.1f}"

    for name in captioners:
        line(f"encoder-only {name}", median[f"encoder {name}"], "images/s", f"(median of {args.repeat}, {spread(f'encoder {name}')})")
        for k in (1, 3):
            key = f"beam {k} {name}"
            line(f"pipeline beam {k} {name}", median[key], "images/s", f"({spread(key)})")
    line("stage: decoding images", 1000 / median["decode"], "ms/image", "(2 threads)")
    for name in captioners:
        line(f"stage: encoding {name}", 1000 / median[f"encoder {name}"], "ms/image")
    for k in (1, 3):
        line(f"stage: search beam {k}", 1000 / median[f"search {k}"], "ms/image")
    line(f"one-at-a-time loop beam 3 {default_name}", median["loop"], "images/s", f"({spread('loop')})")
    for name in list(captioners)[1:]:
        for what in ("encoder", "beam 1", "beam 3"):
            line(f"ratio: {what} {name} / torch fp32", median[f"{what} {name}"] / median[f"{what} torch fp32"], "x")

    if args.skip_process:
        return
    capcli = [sys.executable, "-m", "capcli"]
    runtimes = [("torch", "fp32"), *((("openvino", "auto"), ("auto", "auto")) if ("openvino", "fp32") in chosen else ())]
    walls: dict[tuple[int, str], list[float]] = {}
    for _ in range(args.repeat):  # interleaved: every size and runtime in each round
        for n in args.cold_sizes:
            for runtime, precision in runtimes:
                t = time.perf_counter()
                subprocess.run([*capcli, "caption", "-m", str(model_path), "--device", args.device, "--runtime", runtime,
                                "--precision", precision, *map(str, paths[:n])], check=True, capture_output=True)
                walls.setdefault((n, f"{runtime} {precision}"), []).append(time.perf_counter() - t)
    for (n, name), w in walls.items():
        line(f"cold start: caption {n} image{'s' * (n > 1)}, {name}", statistics.median(w), "s wall", f"(best {min(w):.2f} s)")

    listing = "\n".join(str(paths[i % len(paths)]) for i in range(1000)) + "\n"
    # The child reports its own peak (VmHWM): ru_maxrss of a child also counts this process's
    # memory, which a fork starts from.
    report_peak = ("import atexit, sys; atexit.register(lambda: sys.stderr.write('PEAK ' + "
                   "open('/proc/self/status').read().split('VmHWM:')[1].split()[0] + '\\n')); "
                   "sys.argv[0] = 'capcli'; from capcli.cli import main; main()")
    for runtime, precision in runtimes:
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", report_peak, "beam", "-k", "3", "-m", str(model_path), "--device",
                               args.device, "--runtime", runtime, "--precision", precision, "-"],
                              input=listing, capture_output=True, text=True, check=True)
        wall = time.perf_counter() - t
        assert proc.stdout.count("\n") == 1000
        peak_kib = int(proc.stderr.rsplit("PEAK ", 1)[1].split()[0])
        line(f"peak memory: beam 3, 1000 images, {runtime} {precision}", peak_kib / 1024, "MiB",
             f"({1000 / wall:.1f} images/s end to end, start-up included)")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
