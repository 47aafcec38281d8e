"""Captioning a whole folder: 1 process against N under torchrun, memory over a folder, listing cost.

    python bench/bench_collection.py [--model FILE] [--images DIR] [-n 400] [--processes 2] [--device cpu]

Prints one line per figure:
  1 process / N processes   images/s of `capcli beam DIR -o out.jsonl` end to end (start-up included),
                            medians of --repeat interleaved runs; N processes through torchrun, one
                            share each, merged by process 0
  output ... == 1 process   whether the merged output is byte-identical to one process's, run with 1
                            thread as each torchrun worker is, and with the default threads
  ratio                     N processes / 1 process
  peak memory               max RSS of `capcli beam DIR -o out.jsonl` over a folder of 1000 images, and
                            of `capcli caption DIR --sidecar .txt` (compare with bench_caption's 1000
                            paths streamed from stdin)
  listing                   bytes held per file by the listing of a folder of --files empty image files,
                            against the bytes of the path strings alone
On a GPU (--device cuda) torchrun gives each process its own GPU: --processes up to the GPU count.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MINI = ROOT.parent / "shared" / "data" / "flickr8k-mini" / "Images"
PEAK = ("import atexit, sys; atexit.register(lambda: sys.stderr.write('PEAK ' + "
        "open('/proc/self/status').read().split('VmHWM:')[1].split()[0] + '\\n')); "
        "sys.argv[0] = 'capcli'; from capcli.cli import main; main()")


def line(name: str, value: float, unit: str, extra: str = "") -> None:
    print(f"{name:<40} {value:10.2f} {unit}{'  ' + extra if extra else ''}", flush=True)


def folder_of(images: list[Path], n: int, where: Path) -> Path:
    """n images (repeating the given ones) as symbolic links in 10 subfolders."""
    for i in range(n):
        sub = where / f"part{i % 10}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{i:06d}{images[i % len(images)].suffix}").symlink_to(images[i % len(images)].resolve())
    return where


def differences(a: bytes, b: bytes) -> str:
    import json

    x, y = ([json.loads(line) for line in o.splitlines()] for o in (a, b))
    captions = sum(p.get("caption") != q.get("caption") for p, q in zip(x, y))
    scores = sum(p.get("score") != q.get("score") for p, q in zip(x, y))
    return f"{captions} captions and {scores} scores of {len(x)} differ"


def listing_bytes(files: int, where: Path) -> tuple[float, float]:
    """(bytes per file held by list(expand_paths([folder])), bytes per path string)."""
    import tracemalloc

    from capcli.data.listing import expand_paths

    for d in range(100):
        sub = where / f"d{d:03d}"
        sub.mkdir(parents=True)
        for i in range(files // 100):
            (sub / f"image_{i:07d}.jpg").touch()
    tracemalloc.start()
    found = list(expand_paths([str(where)]))
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    strings = sum(sys.getsizeof(p) for p in found) + sys.getsizeof(found)
    return held / len(found), strings / len(found)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model file (default: the shipped model)")
    ap.add_argument("--images", type=Path, default=MINI, help="folder of images (default: flickr8k-mini)")
    ap.add_argument("-n", type=int, default=400, help="images per throughput run")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--beam-size", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--files", type=int, default=200_000, help="empty files for the listing figure")
    args = ap.parse_args()

    from capcli.infer.captioner import default_model_path

    model = str(Path(args.model) if args.model else default_model_path())
    images = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not images:
        sys.exit(f"no images in {args.images}")
    tmp = Path(tempfile.mkdtemp(prefix="capcli-bench-"))
    try:
        folder = folder_of(images, args.n, tmp / "photos")
        beam = ["beam", "-k", str(args.beam_size), "-m", model, "--device", args.device, str(folder)]
        one_process = [sys.executable, "-m", "capcli", *beam]
        n_processes = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                       str(args.processes), "-m", "capcli", *beam]
        rates: dict[str, list[float]] = {"1": [], "N": []}
        outputs = {}
        for r in range(args.repeat):
            for key, cmd in (("1", one_process), ("N", n_processes)):
                out = tmp / f"out-{key}-{r}.jsonl"
                t = time.perf_counter()
                subprocess.run([*cmd, "-o", str(out)], check=True, capture_output=True)
                rates[key].append(args.n / (time.perf_counter() - t))
                outputs[key] = out.read_bytes()
        spread = {k: f"runs {', '.join(f'{x:.1f}' for x in v)}" for k, v in rates.items()}
        line(f"1 process: beam {args.beam_size}, {args.n} images", statistics.median(rates["1"]), "images/s", spread["1"])
        line(f"{args.processes} processes (torchrun)", statistics.median(rates["N"]), "images/s", spread["N"])
        line(f"ratio: {args.processes} processes / 1", statistics.median(rates["N"]) / statistics.median(rates["1"]), "x")
        # torchrun gives each worker OMP_NUM_THREADS=1; another thread count sums in another order.
        same_threads = tmp / "out-1-thread.jsonl"
        subprocess.run([*one_process, "-o", str(same_threads)], check=True, capture_output=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
        print(f"output of {args.processes} processes == 1 process: with 1 thread like each worker: "
              f"{same_threads.read_bytes() == outputs['N']}; with the default threads: {outputs['1'] == outputs['N']} "
              f"({differences(outputs['1'], outputs['N'])})", flush=True)

        big = folder_of(images, 1000, tmp / "thousand")
        for what, extra in (("beam 3 -o FILE", ["-o", str(tmp / "big.jsonl")]), ("caption --sidecar", ["--sidecar", ".txt"])):
            command = ["beam", "-k", "3"] if what.startswith("beam") else ["caption"]
            proc = subprocess.run([sys.executable, "-c", PEAK, *command, "-m", model, "--device", args.device, str(big), *extra],
                                  capture_output=True, text=True, check=True)
            peak_kib = int(proc.stderr.rsplit("PEAK ", 1)[1].split()[0])
            line(f"peak memory: {what}, 1000 images", peak_kib / 1024, "MiB")

        held, strings = listing_bytes(args.files, tmp / "listing")
        line(f"listing {args.files} files: bytes per file", held, "B", f"(the path strings alone: {strings:.0f} B)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
