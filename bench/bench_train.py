"""Training throughput (captions/s) of one process and of DistributedDataParallel, side by side in one run.

    python bench/bench_train.py [--data DIR] [--images-limit 200] [--epochs 1] [--repeat 1] [--scst | --fine-tune]

Prints one line per figure, each the captions/s of the last epoch's training steps (validation
and the feature cache excluded: the cache is built before the timed runs, and copied in):
  feature cache fp32 / PRECISION    images/s of building the cache (each built --repeat times, interleaved)
  cpu, 1 process, 1 / all threads   plain `capcli train`, fp32 and the automatic precision
  cpu, 2 gloo processes             `torchrun --nproc-per-node 2 -m capcli train`, the cores split between them
  cuda, 1 GPU, bf16/fp16 / fp32     (with a GPU) one process
  cuda, N GPUs nccl                 (with 2+ GPUs) torchrun over all of them
  ratios                            automatic precision / fp32, side by side
  --scst, instead of all the above  an epoch of self-critical training (capcli.train.scst) beside the
                                    cross-entropy epoch it starts from, one process, all threads (or
                                    $OMP_NUM_THREADS): seconds, captions/s (sampled captions for
                                    SCST), the share of the CIDEr-D reward, the ratio of epoch times
  --fine-tune, instead of all these what an epoch costs that trains the encoder too, one process, the
                                    automatic precision, all threads (or $OMP_NUM_THREADS), each run
                                    in a fresh folder: the frozen encoder's cache, --fine-tune-blocks 1
                                    and 3 (the cache of the frozen part below those blocks; the blocks
                                    run at every step) and --fine-tune-encoder (no cache, the whole
                                    encoder at every step); for each the cache's build time and size
                                    per image on disk, the epoch's training seconds and captions/s
--batch-size is the global batch in every case, so all runs do the same arithmetic. On a machine
with 2 CPU cores, expect no gain from 2 processes: the point there is correctness, not speed.
Skips (exit 0, with a message) when the data set is absent.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MINI = ROOT.parent / "shared" / "data" / "flickr8k-mini"


def line(name: str, value: float, unit: str, extra: str = "") -> None:
    print(f"{name:<52} {value:8.1f} {unit}{'  ' + extra if extra else ''}", flush=True)


def subset(data: Path, limit: int, out: Path) -> Path:
    """A caption file with the first ``limit`` images of the Kaggle-layout ``data`` (all their captions)."""
    with open(data / "captions.txt", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    header, rows = rows[0], rows[1:]
    keep = sorted({r[0] for r in rows})[:limit]
    chosen = set(keep)
    path = out / "captions.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(r for r in rows if r[0] in chosen)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=MINI, help="Kaggle-layout data set (default: flickr8k-mini)")
    ap.add_argument("--images-limit", type=int, default=200, help="train on the first N images only, to keep it short (0: all)")
    ap.add_argument("--epochs", type=int, default=1, help="epochs per run; the last one is reported")
    ap.add_argument("--batch-size", type=int, default=64, help="global batch, captions")
    ap.add_argument("--repeat", type=int, default=1, help="alternate the configurations this many times")
    ap.add_argument("--skip-cpu", action="store_true", help="only the GPU figures")
    ap.add_argument("--keep", type=Path, default=None, help="keep the run folders here (default: a temporary folder)")
    ap.add_argument("--scst", action="store_true", help="instead: time a self-critical epoch against a cross-entropy one")
    ap.add_argument("--fine-tune", action="store_true", help="instead: the epoch cost of fine-tuning the encoder's top blocks")
    args = ap.parse_args()

    if not (args.data / "captions.txt").is_file():
        print(f"skipped: no data set at {args.data} (expects captions.txt and Images/)")
        return
    import torch

    work = args.keep or Path(tempfile.mkdtemp(prefix="capcli-bench-train-"))
    work.mkdir(parents=True, exist_ok=True)
    captions = subset(args.data, args.images_limit, work) if args.images_limit else None
    data_args = (["--captions", str(captions), "--images", str(args.data / "Images")] if captions
                 else ["--data", str(args.data)])
    common = [*data_args, "--split-ratios", "90/10/0", "--min-freq", "3", "--batch-size", str(args.batch_size),
              "--epochs", str(args.epochs), "--patience", "99", "--save-every", "0"]
    cores = os.cpu_count() or 1
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if args.fine_tune:
        fine_tune_costs(args, work, common, "cuda" if gpus else "cpu")
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        return

    def env(threads: int | None, **extra) -> dict:
        e = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
        if threads:
            e["OMP_NUM_THREADS"] = str(threads)
        e.update(extra)
        return e

    def run(name: str, cmd: list[str], e: dict, device: str, precision: str, extra: tuple = (), keep: bool = False) -> dict | None:
        out = work / f"{name}-{time.time_ns()}"
        for f in (work / f"cache-{device}-{precision}").glob("features-*"):  # the cache is not what we measure
            out.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, out / f.name)
        t0 = time.time()
        base = list(common)
        if "--init" in extra:  # the vocabulary comes from the model file
            k = base.index("--min-freq")
            del base[k:k + 2]
        p = subprocess.run([*cmd, "-q", "train", "-o", str(out), *base, "--device", device, "--precision", precision,
                            *extra], env=e, capture_output=True, text=True)
        if p.returncode != 0:
            print(f"# {name}: failed (exit {p.returncode}): {p.stderr.strip().splitlines()[-1:]}", flush=True)
            return None
        last = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]
        last["wall"] = time.time() - t0
        last["run"] = out
        if not args.keep and not keep:
            shutil.rmtree(out, ignore_errors=True)
        return last

    capcli = [sys.executable, "-m", "capcli"]

    def torchrun(n: int) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), "-m", "capcli"]

    from capcli.runtime.devices import cpu_has_bf16, resolve_precision

    # the CPU's other precision: the automatic one, or bf16 where the CPU has it even if auto keeps fp32
    cpu_auto = resolve_precision("auto", torch.device("cpu"))
    cpu_auto = "bf16" if cpu_auto == "fp32" and cpu_has_bf16() else cpu_auto
    configs = []
    if not args.skip_cpu:
        for t in sorted({1, cores}):
            for p in sorted({"fp32", cpu_auto}, reverse=True):
                configs.append((f"cpu {p}, 1 process, {t} thread{'s' * (t > 1)}", capcli, env(t), "cpu", p))
        half = max(1, cores // 2)
        configs.append((f"cpu {cpu_auto}, 2 gloo processes, {half} thread{'s' * (half > 1)} each", torchrun(2), env(half), "cpu", cpu_auto))
    if gpus:
        gpu_auto = resolve_precision("auto", torch.device("cuda"))
        configs += [(f"cuda {p}, 1 GPU", capcli, env(None), "cuda", p) for p in (gpu_auto, "fp32")]
        if gpus >= 2:
            configs.append((f"cuda {gpu_auto}, {gpus} GPUs nccl", torchrun(gpus), env(None), "cuda", gpu_auto))
    if args.scst:
        # Instead of the comparisons above: one process, the automatic precision, all threads (the
        # GPU where there is one); a cross-entropy run, then one self-critical epoch from its best
        # model, on the same cache.
        device = "cuda" if gpus else "cpu"
        precision = resolve_precision("auto", torch.device(device))
        threads = None if gpus or "OMP_NUM_THREADS" in os.environ else cores
        configs = [(f"{device} {precision}, 1 process", capcli, env(threads), device, precision)]
    print(f"# {'first ' + str(args.images_limit) + ' images of ' if captions else ''}{args.data}, global batch "
          f"{args.batch_size}, {args.epochs} epoch(s) per run, torch {torch.__version__}, {cores} CPU cores, {gpus} GPUs",
          flush=True)

    # Build each (device, precision)'s feature cache, --repeat times interleaved, timing the encoding
    # (Trainer.setup builds it; no training). The last copy is used by the training runs.
    import statistics

    from capcli.train.loop import Trainer
    from capcli.train.config import TrainConfig

    import logging
    import re

    class CacheTimes(logging.Handler):  # the cache reports "cached features of N images in S s"
        def emit(self, record):
            if m := re.match(r"cached features of (\d+) images in ([\d.]+) s", record.getMessage()):
                self.rate = int(m[1]) / max(float(m[2]), 1e-9)

    timer = CacheTimes()
    logging.getLogger("capcli").addHandler(timer)
    logging.getLogger("capcli").setLevel(logging.INFO)
    for p in (args.data / "Images").iterdir():  # the first build must not pay for reading the files from disk
        p.read_bytes()
    caches: dict[tuple[str, str], list[float]] = {(c[3], c[4]): [] for c in configs}
    for _ in range(args.repeat):
        for device, precision in caches:
            folder = work / f"cache-{device}-{precision}"
            shutil.rmtree(folder, ignore_errors=True)
            cfg = TrainConfig(output=str(folder), split="90/10/0", min_freq=3, device=device, precision=precision,
                              **({"captions": str(captions), "images": str(args.data / "Images")} if captions else {"data": str(args.data)}))
            Trainer(cfg).setup()
            caches[device, precision].append(timer.rate)
    for (device, precision), rates in caches.items():
        line(f"feature cache {device} {precision}", statistics.median(rates), "images/s",
             f"(decode + encode; median of {len(rates)}, min {min(rates):.1f}, max {max(rates):.1f})")

    results: dict[str, list[dict]] = {name: [] for name, *_ in configs}
    for _ in range(0 if args.scst else args.repeat):
        for name, cmd, e, device, precision in configs:
            r = run("".join(c if c.isalnum() else "-" for c in name)[:40], cmd, e, device, precision)
            if r is not None:
                results[name].append(r)
    rates = {}
    for name, rs in results.items():
        if rs:
            rates[name] = statistics.median(r["captions_per_s"] for r in rs)
            line(f"train {name}", rates[name], "captions/s",
                 f"(train loss {rs[-1]['train_loss']:.4f}; median of {len(rs)} run(s))")
    for device in sorted({c[3] for c in configs} if not args.scst else ()):
        auto = cpu_auto if device == "cpu" else resolve_precision("auto", torch.device(device))  # as configured above
        if auto != "fp32":
            fp32 = caches.get((device, "fp32"))
            if fp32:
                line(f"ratio: feature cache {device} {auto} / fp32", statistics.median(caches[device, auto]) / statistics.median(fp32), "x")
            for name in rates:
                other = name.replace(f"{device} {auto},", f"{device} fp32,")
                if name.startswith(f"{device} {auto},") and other in rates:
                    line(f"ratio: train {name} / fp32", rates[name] / rates[other], "x")
    if args.scst:
        name, cmd, e, device, precision = configs[0]
        for _ in range(args.repeat):
            xe = run("scst-xe", cmd, e, device, precision, keep=True)
            if xe is None:
                break
            sc = run("scst", cmd, e, device, precision, ("--init", str(xe["run"] / "best.safetensors"), "--scst-after", "0",
                                                          "--epochs", "1"))
            if sc is None:
                break
            line(f"xe epoch ({name})", xe["captions_per_s"], "captions/s", f"({xe['train_seconds']:.1f} s)")
            line(f"scst epoch ({name})", sc["captions_per_s"], "captions/s",
                 f"(sampled, {sc['train_seconds']:.1f} s; CIDEr-D reward {sc['reward_seconds']:.2f} s = "
                 f"{sc['reward_seconds'] / max(sc['train_seconds'], 1e-9):.1%}; mean reward {sc['train_reward']:.3f})")
            line("ratio: scst / xe epoch time", sc["train_seconds"] / max(xe["train_seconds"], 1e-9), "x")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


# --fine-tune: the runs compared, and what each adds to the command line
FINE_TUNE_RUNS = (
    ("frozen encoder (cache of its features)", []),
    ("--fine-tune-blocks 1 (cache below the head)", ["--fine-tune-blocks", "1"]),
    ("--fine-tune-blocks 3 (cache below blocks.5)", ["--fine-tune-blocks", "3"]),
    ("--fine-tune-encoder (whole encoder per step)", ["--fine-tune-encoder"]),
)


def fine_tune_costs(args, work: Path, common: list[str], device: str) -> None:
    """Each of FINE_TUNE_RUNS in a fresh run folder, --repeat times interleaved: the cache's build
    time and its size per image, the epochs' training seconds (the last epoch's) and captions/s."""
    import re
    import statistics

    import torch

    for p in (args.data / "Images").iterdir():  # the first run must not pay for reading the files from disk
        p.read_bytes()
    e = dict(os.environ)
    if "OMP_NUM_THREADS" not in e and device == "cpu":
        e["OMP_NUM_THREADS"] = str(os.cpu_count() or 1)
    print(f"# {'first ' + str(args.images_limit) + ' images of ' if args.images_limit else ''}{args.data}, global batch "
          f"{args.batch_size}, {args.epochs} epoch(s) per run, {device}, --precision auto, "
          f"{e.get('OMP_NUM_THREADS', 'default')} threads, torch {torch.__version__}", flush=True)
    seen: dict[str, list[dict]] = {name: [] for name, _ in FINE_TUNE_RUNS}
    for k in range(args.repeat):
        for i, (name, extra) in enumerate(FINE_TUNE_RUNS):
            out = work / f"fine-tune-{i}-{k}"
            t0 = time.time()
            p = subprocess.run([sys.executable, "-m", "capcli", "train", "-o", str(out), *common, "--device", device,
                                *extra], env=e, capture_output=True, text=True)
            if p.returncode != 0:
                print(f"# {name}: failed (exit {p.returncode}): {p.stderr.strip().splitlines()[-1:]}", flush=True)
                continue
            r = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]
            cached = re.search(r"cached features of (\d+) images in ([\d.]+) s", p.stderr)
            r["cache_seconds"] = float(cached[2]) if cached else 0.0
            r["cache_bytes"] = sum(f.stat().st_size for f in out.glob("features-*.f16")) / int(cached[1]) if cached else 0.0
            r["wall"] = time.time() - t0
            seen[name].append(r)
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
    for name, rs in seen.items():
        if not rs:
            continue
        median = {key: statistics.median(r[key] for r in rs) for key in ("train_seconds", "captions_per_s", "cache_seconds",
                                                                         "cache_bytes", "wall", "val_seconds")}
        cache = (f"cache {median['cache_seconds']:.1f} s once, {median['cache_bytes'] / 1024:.1f} KiB/image"
                 if median["cache_bytes"] else "no cache")
        line(f"epoch: {name}", median["train_seconds"], "s",
             f"({median['captions_per_s']:.0f} captions/s; {cache}; val {median['val_seconds']:.1f} s; "
             f"whole run {median['wall']:.0f} s; train loss {rs[-1]['train_loss']:.3f}; median of {len(rs)})")


if __name__ == "__main__":
    main()
