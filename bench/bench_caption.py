"""Captioning throughput, start-up time and memory, side by side in one run.

    python bench/bench_caption.py [--model FILE] [--images DIR] [-n 200]

Prints one line per figure:
  encoder-only bound    images/s of the encoder alone on preprocessed images, at its best batch size
  pipeline beam 1 / 3   images/s of Captioner.caption_stream over the image files (decode + encode + search)
  (these two for fp32 and for the automatic precision, e.g. bf16 on a CPU that has it)
  one-at-a-time loop    images/s captioning one image per call, model loaded once (beam 3)
  (all of these: medians of --repeat interleaved runs, with their spread)
  ratios                pipeline / bound, pipeline / loop, automatic precision / fp32
  cold start            wall seconds of `capcli caption one.jpg` in a fresh process (best and median of 3)
  peak memory           max RSS of `capcli beam` over 1000 image paths (streamed from stdin)
On a GPU (--device cuda) the same figures are measured there.
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
    args = ap.parse_args()

    import torch

    from capcli.infer.captioner import Captioner, default_model_path
    from capcli.cli import keep_freed_memory
    from capcli.runtime.devices import autocast
    from capcli.data.images import image_to_tensor, load_image
    from capcli.infer.decode import DecodeOptions

    keep_freed_memory()  # as the capcli command does

    model_path = Path(args.model) if args.model else default_model_path()
    paths = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[: args.n]
    if not paths:
        sys.exit(f"no images in {args.images}")
    cap = Captioner.load(model_path, args.device)  # the automatic precision
    cfg = cap.cfg
    from capcli.runtime.devices import cpu_has_bf16

    # fp32 first, then the automatic precision, and bf16 where the CPU has it even if auto keeps fp32
    precisions = sorted({"fp32", cap.precision} | ({"bf16"} if cap.device.type == "cpu" and cpu_has_bf16() else set()),
                        key=lambda p: (p != "fp32", p))
    captioners = {p: Captioner(cap.loaded, cap.device, p) for p in precisions}
    print(f"# {len(paths)} images from {args.images}, model {model_path.name}, device {cap.device}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch_size}, "
          f"precisions {' and '.join(precisions)} (auto: {cap.precision})", flush=True)

    def sync():
        if cap.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn, n: int) -> float:
        """images/s of fn() over n images"""
        sync()
        t = time.perf_counter()
        fn()
        sync()
        return n / (time.perf_counter() - t)

    # (a) the bound: the encoder alone, images already decoded and resized, at its best batch size
    x = torch.stack([image_to_tensor(load_image(p), cfg.image_size, cfg.mean, cfg.std) for p in paths]).to(cap.device)

    @torch.inference_mode()
    def encoder_only(b: int, precision: str) -> None:
        with autocast(cap.device, precision):
            for k in range(0, len(x), b):
                cap.model.encoder(x[k:k + b])

    best_batch = {}
    for p in precisions:
        rates_by_batch = {}
        for b in (1, 2, 4, 8, 16, 32, 64):
            encoder_only(b, p)  # warm-up: oneDNN builds its kernels for this shape
            rates_by_batch[b] = timed(lambda: encoder_only(b, p), len(x))
        best_batch[p] = max(rates_by_batch, key=rates_by_batch.get)

    # The pipeline as `capcli caption/beam` runs it, and (b) a loop captioning one image per call.
    # This machine's speed wanders by +-20% from one second to the next, so the measurements are
    # interleaved, repeated, and the medians compared.
    few = paths[: max(20, len(paths) // 4)]
    list(cap.caption_stream(paths, DecodeOptions(beam_size=1), batch_size=args.batch_size))  # warm-up: files in the page cache
    runs: dict[str, list[float]] = {}
    for _ in range(args.repeat):
        for p, c in captioners.items():
            runs.setdefault(f"bound {p}", []).append(timed(lambda: encoder_only(best_batch[p], p), len(x)))
            for k in (1, 3):
                runs.setdefault(f"beam {k} {p}", []).append(
                    timed(lambda: list(c.caption_stream(paths, DecodeOptions(beam_size=k), batch_size=args.batch_size)), len(paths)))
        runs.setdefault("loop", []).append(timed(lambda: [cap.caption([p], beam_size=3) for p in few], len(few)))
    median = {key: statistics.median(v) for key, v in runs.items()}

    def spread(key: str) -> str:
        return f"min {min(runs[key]):.1f}, max {max(runs[key]):.1f}"

    for p in precisions:
        bound = median[f"bound {p}"]
        line(f"encoder-only bound {p}", bound, "images/s", f"(batch {best_batch[p]}; median of {args.repeat}, {spread(f'bound {p}')})")
        for k in (1, 3):
            key = f"beam {k} {p}"
            line(f"pipeline beam {k} {p}", median[key], "images/s", f"({median[key] / bound:.2f}x the {p} encoder bound; {spread(key)})")
    line(f"one-at-a-time loop beam 3 {cap.precision}", median["loop"], "images/s", f"({spread('loop')})")
    line(f"pipeline beam 3 {cap.precision} / loop", median[f"beam 3 {cap.precision}"] / median["loop"], "x")
    for p in precisions[1:]:
        for what in ("bound", "beam 1", "beam 3"):
            line(f"ratio: {what} {p} / fp32", median[f"{what} {p}"] / median[f"{what} fp32"], "x")

    if args.skip_process:
        return
    capcli = [sys.executable, "-m", "capcli"]
    walls = []
    for _ in range(3):
        t = time.perf_counter()
        subprocess.run([*capcli, "caption", "-m", str(model_path), "--device", args.device, str(paths[0])],
                       check=True, capture_output=True)
        walls.append(time.perf_counter() - t)
    line("cold start: caption one.jpg", min(walls), "s wall", f"(median {statistics.median(walls):.2f} s)")

    listing = "\n".join(str(paths[i % len(paths)]) for i in range(1000)) + "\n"
    # The child reports its own peak (VmHWM): ru_maxrss of a child also counts this process's
    # memory, which a fork starts from.
    report_peak = ("import atexit, sys; atexit.register(lambda: sys.stderr.write('PEAK ' + "
                   "open('/proc/self/status').read().split('VmHWM:')[1].split()[0] + '\\n')); "
                   "sys.argv[0] = 'capcli'; from capcli.cli import main; main()")
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", report_peak, "beam", "-k", "3", "-m", str(model_path),
                           "--device", args.device, "-"], input=listing, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t
    assert proc.stdout.count("\n") == 1000
    peak_kib = int(proc.stderr.rsplit("PEAK ", 1)[1].split()[0])
    line("peak memory: beam 3 over 1000 images", peak_kib / 1024, "MiB", f"({1000 / wall:.1f} images/s end to end, start-up included)")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
