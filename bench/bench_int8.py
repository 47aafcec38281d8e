"""Should the image encoder offer --precision int8? Speed and quality of int8 vs bf16 vs fp32, in one run.

    pip install torchao    # PT2E quantization moved there from torch.ao
    python bench/bench_int8.py [--images DIR] [-n 200] [--calib 64] [--rounds 3]

The int8 encoder is PyTorch's own x86 post-training quantization (PT2E): torch.export, then
prepare_pt2e / convert_pt2e with X86InductorQuantizer (default config: static, per-tensor
activations, per-channel weights), calibrated on the first --calib sorted images of --images.
The next -n images are the evaluation set. int8 is run both as the converted graph eagerly
(quantize/dequantize ops around fp32 kernels) and through torch.compile (inductor, with
freezing, which lowers the pattern to oneDNN int8 kernels).

Prints one line per figure:
  encoder images/s    at batch 4 and 32, for fp32, bf16 autocast, int8 eager, bf16 compiled and
                      int8 compiled: medians of --rounds interleaved rounds (fp32, bf16, int8, ...
                      then again), with min and max; images already decoded and resized
  ratios              int8/fp32, bf16/fp32, int8/bf16 (and compiled against compiled)
  compile time        seconds of the first call at each batch size (not in the rates; a warm inductor
                      cache shortens it: TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 for a cold figure)
  feature error       relative L2 difference from fp32, ||f - f32|| / ||f32||, mean over images
  caption agreement   share of images whose best caption (token ids) equals fp32's, beam 3 and greedy
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MINI = ROOT.parent / "shared" / "data" / "flickr8k-mini" / "Images"
BATCHES = (4, 32)


def line(name: str, value: float, unit: str, extra: str = "") -> None:
    print(f"{name:<40} {value:10.2f} {unit}{'  ' + extra if extra else ''}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=Path, default=MINI, help="folder of images (default: flickr8k-mini)")
    ap.add_argument("-n", type=int, default=200, help="evaluation images (after the calibration ones)")
    ap.add_argument("--calib", type=int, default=64, help="calibration images (the first ones, sorted by name)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the speed figures (medians reported)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    args = ap.parse_args()

    warnings.filterwarnings("ignore")
    import torch
    import torch._inductor.config as inductor_config

    from capcli.infer.captioner import Captioner
    from capcli.data.images import image_to_tensor, load_image
    from capcli.infer.decode import DecodeOptions, decode

    try:  # torch 2.15 no longer ships torch.ao.quantization.quantizer; PT2E lives in torchao now
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
    except ImportError:
        try:
            from torch.ao.quantization.quantize_pt2e import convert_pt2e, prepare_pt2e
            from torch.ao.quantization.quantizer import x86_inductor_quantizer as xiq
        except ImportError:
            sys.exit("skipped: PT2E quantization not found; it lives in torchao now: pip install torchao")

    torch.set_num_threads(args.threads)
    paths = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    calib_paths, eval_paths = paths[: args.calib], paths[args.calib: args.calib + args.n]
    if len(eval_paths) < max(BATCHES):
        sys.exit(f"need more than {args.calib + max(BATCHES)} images in {args.images}")
    cap = Captioner.load(device="cpu")
    cfg, encoder = cap.cfg, cap.model.encoder.eval()

    def tensors(ps):
        return torch.stack([image_to_tensor(load_image(p, draft_size=cfg.image_size), cfg.image_size, cfg.mean, cfg.std)
                            for p in ps])

    x_calib, x_eval = tensors(calib_paths), tensors(eval_paths)
    try:
        import torchao

        torchao_version = torchao.__version__
    except ImportError:
        torchao_version = "absent"
    print(f"# {len(calib_paths)} calibration + {len(eval_paths)} evaluation images from {args.images}; "
          f"torch {torch.__version__}, torchao {torchao_version}, {torch.get_num_threads()} threads", flush=True)

    # int8: export (batch dimension dynamic), insert observers, calibrate, convert to q/dq ops
    t = time.perf_counter()
    batch = torch.export.Dim("batch", min=1, max=1024)
    exported = torch.export.export(encoder, (x_calib[:8],), dynamic_shapes=({0: batch},)).module()
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    with torch.inference_mode():
        for k in range(0, len(x_calib), 16):
            prepared(x_calib[k:k + 16])
    int8 = convert_pt2e(prepared)
    line("int8: export + calibrate + convert", time.perf_counter() - t, "s")

    def bf16(f):
        def run(x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return f(x)
        return run

    variants = {"fp32": encoder, "bf16": bf16(encoder), "int8 eager": int8}
    compile_s: dict[str, dict[int, float]] = {}
    if not args.no_compile:
        inductor_config.freezing = True  # weights as constants: needed for the oneDNN int8 lowering
        # dynamic=False: one static graph per batch size (the timed loops use whole batches only)
        variants["bf16 compiled"] = bf16(torch.compile(encoder, dynamic=False))
        variants["int8 compiled"] = torch.compile(int8, dynamic=False)

    def run_all(f, x: torch.Tensor, b: int) -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat([f(x[k:k + b]).float() for k in range(0, len(x), b)])

    # warm-up per batch size (compiled variants: this first call is the compile)
    for name, f in variants.items():
        for b in BATCHES:
            t = time.perf_counter()
            run_all(f, x_eval[:b], b)
            compile_s.setdefault(name, {})[b] = time.perf_counter() - t

    # speed, interleaved: this machine's speed wanders, so every round runs every variant
    rates: dict[tuple[str, int], list[float]] = {(name, b): [] for name in variants for b in BATCHES}
    for _ in range(args.rounds):
        for b in BATCHES:
            x = x_eval[: len(x_eval) // b * b]
            for name, f in variants.items():
                t = time.perf_counter()
                run_all(f, x, b)
                rates[name, b].append(len(x) / (time.perf_counter() - t))
    med = {key: statistics.median(v) for key, v in rates.items()}
    for b in BATCHES:
        for name in variants:
            r = rates[name, b]
            line(f"batch {b:<2} {name}", med[name, b], "images/s",
                 f"(median of {len(r)}, min {min(r):.1f}, max {max(r):.1f}; {med[name, b] / med['fp32', b]:.2f}x fp32)")
    for b in BATCHES:
        pairs = [("int8 eager", "fp32"), ("bf16", "fp32"), ("int8 eager", "bf16")]
        if not args.no_compile:
            pairs = [("int8 compiled", "fp32"), ("bf16", "fp32"), ("int8 compiled", "bf16"),
                     ("int8 compiled", "bf16 compiled"), ("bf16 compiled", "fp32"), ("int8 eager", "fp32")]
        text = ", ".join(f"{a}/{c} {med[a, b] / med[c, b]:.2f}x" for a, c in pairs[1:])
        a, c = pairs[0]
        line(f"batch {b:<2} ratio {a}/{c}", med[a, b] / med[c, b], "x", f"({text})")
    if not args.no_compile:
        for name in ("bf16 compiled", "int8 compiled"):
            s = compile_s[name]
            line(f"compile time {name}", sum(s.values()), "s",
                 f"(first call: batch 4 {s[4]:.1f} s, batch 32 {s[32]:.1f} s; eager first calls "
                 f"{max(compile_s['fp32'].values()):.1f} s at most)")

    # quality, on all evaluation images (batch 4: every compiled graph already exists for it)
    feats = {name: run_all(f, x_eval, 4) for name, f in variants.items()}
    ref = feats["fp32"]
    for name, f in feats.items():
        if name != "fp32":
            rel = ((f - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1))
            line(f"feature rel. L2 diff {name}", 100 * rel.mean().item(), "%",
                 f"(vs fp32, mean over {len(rel)} images; median {100 * rel.median().item():.2f}%, max {100 * rel.max().item():.2f}%)")

    def captions(f: torch.Tensor, beam: int) -> list[list[int]]:
        out = []
        with torch.inference_mode():
            for k in range(0, len(f), 50):
                out += [h[0].tokens for h in decode(cap.model.decoder, f[k:k + 50].float(), DecodeOptions(beam_size=beam))]
        return out

    to_compare = ["bf16", "int8 compiled" if "int8 compiled" in feats else "int8 eager"]
    if "int8 compiled" in feats:
        to_compare.append("int8 eager")
    for beam in (3, 1):
        ref_caps = captions(ref, beam)
        for name in to_compare:
            same = sum(a == b for a, b in zip(captions(feats[name], beam), ref_caps))
            line(f"same caption as fp32 {name} k={beam}", 100 * same / len(ref_caps), "%",
                 f"({same} of {len(ref_caps)}, {'greedy' if beam == 1 else f'beam {beam}'})")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
