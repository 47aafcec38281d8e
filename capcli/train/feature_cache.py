"""The feature cache: what the frozen encoder (or its frozen lower part) makes of every image,
encoded once, fp16, memory-mapped from the run folder.

Single process: encode what is missing, in order, recording progress as it goes (an interrupted
caching run continues where it stopped). Under torchrun each image is still encoded once, by one
rank; see ``build_feature_cache``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from capcli.runtime import distributed
from capcli.runtime.devices import autocast
from capcli.runtime.distributed import DistContext
from capcli.files import FileProblem, atomic_write_bytes, parse_json
from capcli.data.images import ImageError, image_batches, model_input
from capcli.model.config import ModelConfig
from capcli.progress import Reporter

log = logging.getLogger("capcli")

Encode = Callable[[torch.Tensor], torch.Tensor]  # normalised images (b, 3, S, S) -> their rows of the cache


def _intervals(mask: torch.Tensor) -> list[list[int]]:
    """Bool (n,) -> [[lo, hi), ...] runs of True, for the JSON progress records."""
    m = mask.to(torch.int8)
    edge = torch.diff(m, prepend=m.new_zeros(1), append=m.new_zeros(1))
    return [[int(a), int(b)] for a, b in zip((edge == 1).nonzero().flatten(), (edge == -1).nonzero().flatten())]


def _runs(rows: Sequence[int]) -> list[tuple[int, int, int]]:
    """Sorted row numbers -> (start row, position in rows, count) of each run of consecutive rows."""
    out: list[tuple[int, int, int]] = []
    for k, r in enumerate(rows):
        if out and out[-1][0] + out[-1][2] == r:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1)
        else:
            out.append((r, k, 1))
    return out


def _read_record(path: Path, n: int) -> tuple[int, list[tuple[int, int]], dict[int, str]]:
    """(done, ranges, bad) of a progress record of ``n`` rows; FileProblem when it is damaged, OSError
    when it cannot be read (e.g. a part record merged and removed meanwhile)."""
    state = parse_json(path.read_bytes(), str(path))  # FileProblem: not JSON, nested too deeply, a huge number
    if not isinstance(state, dict):
        raise FileProblem(f"{path}: damaged progress record (not a JSON object)")
    done, ranges, bad = state.get("done", 0), state.get("ranges", []), state.get("bad", {})
    if not (_is_row(done, n + 1)
            and isinstance(ranges, list) and all(isinstance(r, list) and len(r) == 2 for r in ranges)
            and all(_is_row(lo, n + 1) and _is_row(hi, n + 1) and lo <= hi for lo, hi in ranges)
            and isinstance(bad, dict) and all(_is_row_key(k, n) and isinstance(v, str) for k, v in bad.items())):
        raise FileProblem(f"{path}: damaged progress record (its rows are not whole numbers in 0..{n})")
    return done, [(lo, hi) for lo, hi in ranges], {int(k): v for k, v in bad.items()}


def _is_row(x: object, end: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < end


def _is_row_key(key: str, n: int) -> bool:
    return key.isdecimal() and len(key) < 20 and int(key) < n


class FeatureCache:
    """Encoder features of a list of images, fp16, memory-mapped from one file: one row per image,
    the encoder's features (L, D), or with --fine-tune-blocks the output (C, h, w) of the frozen
    part below the fine-tuned blocks.

    The file lives in the run folder and is reused by --resume; a key made of the encoder, its
    weights, the split point and the image list guards against reusing features that no longer match. Progress
    is recorded as it goes, so an interrupted caching run continues where it stopped.

    Progress: ``features-KEY.json`` holds {"done": rows 0..done-1 are cached, "bad": {row: why},
    "ranges": further cached [lo, hi) runs (only after a distributed run was interrupted)}.
    Under torchrun each process encodes its own share of the rows and records its progress in
    ``features-KEY.part-rR.json``; one process per folder merges them into the main record.
    """

    def __init__(self, directory: Path, key: str, shape: tuple[int, ...], create: bool = True):
        self.directory, self.key = Path(directory), key
        self.data_path = self.directory / f"features-{key}.f16"
        self.index_path = self.directory / f"features-{key}.json"
        self.shape = shape  # (images, *one image's row): (n, L, D) or (n, C, h, w)
        n = shape[0]
        self.row_bytes = math.prod(shape[1:]) * 2
        if create and (not self.data_path.exists() or self.data_path.stat().st_size != n * self.row_bytes):
            with open(self.data_path, "wb") as f:
                f.truncate(n * self.row_bytes)
            for part in self._part_paths():
                part.unlink(missing_ok=True)
            atomic_write_bytes(self.index_path, json.dumps({"done": 0, "bad": {}}).encode())
        self.remap()
        self.reload_progress()

    def remap(self) -> None:
        """(Re)open the memory map: after other processes wrote rows, perhaps on other machines."""
        self.features = torch.from_file(str(self.data_path), shared=True, size=math.prod(self.shape),
                                        dtype=torch.float16).view(self.shape)  # (n, L, D) or (n, C, h, w)

    def _part_paths(self) -> list[Path]:
        return sorted(self.directory.glob(f"features-{self.key}.part-r*.json"))

    def part_path(self, rank: int) -> Path:
        return self.directory / f"features-{self.key}.part-r{rank}.json"

    def reload_progress(self) -> None:
        """``have`` (rows cached or known bad) and ``bad`` from the main record and any part records."""
        n = self.shape[0]
        self.have = torch.zeros(n, dtype=torch.bool)
        self.bad: dict[int, str] = {}
        records = [self.index_path] if self.index_path.exists() else []
        for path in records + self._part_paths():
            try:
                done, ranges, bad = _read_record(path, n)
            except FileProblem as e:  # the cache can be rebuilt: what a damaged record held is encoded again
                log.warning("%s; the images it recorded will be encoded again", e)
                continue
            except OSError:
                continue  # a part record merged and removed meanwhile, or unreadable: its rows are encoded again
            self.have[:done] = True
            for lo, hi in ranges:
                self.have[lo:hi] = True
            self.bad.update(bad)

    @property
    def done(self) -> int:
        """Rows 0..done-1 are all cached (or known bad)."""
        missing = (~self.have).nonzero()
        return int(missing[0, 0]) if len(missing) else self.shape[0]

    def _record(self, have: torch.Tensor, bad: dict[int, str], main: bool) -> bytes:
        if main:
            done = int((~have).nonzero()[0, 0]) if not bool(have.all()) else len(have)
            state = {"done": done, "bad": bad}
            rest = have.clone()
            rest[:done] = False
            if bool(rest.any()):
                state["ranges"] = _intervals(rest)
        else:
            state = {"ranges": _intervals(have), "bad": bad}
        return json.dumps(state).encode()

    def consolidate(self) -> None:
        """Fold the part records into the main one (one process per folder does this)."""
        atomic_write_bytes(self.index_path, self._record(self.have, self.bad, main=True))
        for part in self._part_paths():
            part.unlink(missing_ok=True)

    def write_rows(self, fd: int, rows: Sequence[int], f: torch.Tensor) -> None:
        """Write features f (len(rows), ...) of sorted ``rows`` with pwrite (safe for neighbouring rows
        written by other processes, also over NFS, unlike writes through a shared mapping)."""
        data = f.to("cpu", torch.float16).contiguous().view(torch.uint8).reshape(len(rows), -1).numpy()  # (k, row bytes)
        for start, pos, count in _runs(rows):
            os.pwrite(fd, data[pos:pos + count].tobytes(), start * self.row_bytes)

    def encode(self, encoder: Encode, rows: Sequence[int], paths: Sequence[Path], cfg: ModelConfig,
               device: torch.device, precision: str, reporter: Reporter, workers: int, batch_size: int,
               part: int | None = None, description: str = "caching features") -> None:
        """Encode images ``paths[r]`` for the sorted ``rows`` with ``encoder`` (images -> rows of the
        cache); unreadable images are recorded in ``bad``.

        Progress goes to the main record, or to part record ``part`` (a rank) when given.
        """
        if not rows:
            return
        t0 = time.time()
        encoded_now = torch.zeros(self.shape[0], dtype=torch.bool)  # rows this call encoded, for a part record
        bad_now: dict[int, str] = {}
        reporter.start(description, len(rows), unit="images")
        last_save = time.time()
        fd = os.open(self.data_path, os.O_RDWR)

        def save_progress():
            if part is None:
                atomic_write_bytes(self.index_path, self._record(self.have, self.bad, main=True))
            else:
                atomic_write_bytes(self.part_path(part), self._record(encoded_now, bad_now, main=False))

        batches = image_batches([paths[r] for r in rows], cfg.image_size, batch_size, workers,
                                overlap=device.type == "cuda")
        try:
            for start, items in zip(range(0, len(rows), batch_size), batches):
                good_rows, good = [], []
                for i, (path, item) in zip(rows[start:start + batch_size], items):
                    if isinstance(item, ImageError):
                        self.bad[i] = bad_now[i] = f"{path}: {item}"
                    else:
                        good_rows.append(i)
                        good.append(item)
                if good:
                    x = model_input(good, device, cfg.mean, cfg.std)  # (b, 3, S, S)
                    with torch.no_grad(), autocast(device, precision):
                        f = encoder(x)  # (b, L, D), or (b, C, h, w)
                    self.write_rows(fd, good_rows, f)
                rows_done = rows[start:start + len(items)]
                self.have[rows_done] = encoded_now[rows_done] = True
                reporter.update(len(items))
                if time.time() - last_save > 30:
                    os.fsync(fd)
                    save_progress()
                    last_save = time.time()
        finally:
            os.fsync(fd)  # the rows reach the file before the record says they are there
            os.close(fd)
            save_progress()  # keep what was done, also on Ctrl-C
            reporter.stop()
        n = len(rows)
        log.info("cached features of %d images in %.1f s (%.1f ms/image)", n, time.time() - t0, 1000 * (time.time() - t0) / max(n, 1))

    def fill(self, encoder: Encode, paths: Sequence[Path], cfg: ModelConfig, device: torch.device,
             precision: str, reporter: Reporter, workers: int, batch_size: int) -> None:
        """Encode every image not cached yet, in this process (the single-process cache build)."""
        if self._part_paths():
            self.consolidate()
        rows = (~self.have).nonzero().flatten().tolist()
        self.encode(encoder, rows, paths, cfg, device, precision, reporter, workers, batch_size)


def build_feature_cache(ctx: DistContext, directory: Path, key: str, shape: tuple[int, ...],
                        encoder: Encode, paths: Sequence[Path], cfg: ModelConfig, device: torch.device,
                        precision: str, reporter: Reporter, workers: int, batch_size: int) -> FeatureCache:
    """The complete feature cache of ``paths`` in ``directory``, on every rank; each image encoded once.

    Alone: encode what is missing. Under torchrun: the processes that see the same ``directory``
    share one file (one machine, or a shared filesystem); the rows still missing in any folder are
    cut into whole encoder batches, each rank encodes a contiguous share into its folder's file,
    and when the ranks have more than one folder (machines with local disks) the first rank of each
    folder sends its folder's new rows to the other folders' first ranks (a broadcast per chunk).
    """
    if not ctx.enabled:
        cache = FeatureCache(directory, key, shape)
        cache.fill(encoder, paths, cfg, device, precision, reporter, workers, batch_size)
        return cache
    leaders = distributed.storage_leaders(ctx, directory)
    leader = leaders[ctx.rank] == ctx.rank
    cache = None
    if leader:
        cache = FeatureCache(directory, key, shape)  # creates the file, merges parts left by a stopped run
        cache.consolidate()
    distributed.barrier(ctx)
    if not leader:
        cache = FeatureCache(directory, key, shape, create=False)
    assert cache is not None
    # A row is missing when one folder lacks it; folders that have it get it again (rare: a run
    # stopped while caching on machines with local disks).
    n = shape[0]
    have_everywhere = torch.ones(n, dtype=torch.bool)
    known_bad: dict[int, str] = {}
    for ranges, bad in distributed.all_gather_object(ctx, (_intervals(cache.have), cache.bad)):
        mask = torch.zeros(n, dtype=torch.bool)
        for lo, hi in ranges:
            mask[lo:hi] = True
        have_everywhere &= mask
        known_bad.update(bad)
    todo = (~have_everywhere).nonzero().flatten().tolist()
    known_bad = {i: why for i, why in known_bad.items() if have_everywhere[i]}
    if todo:
        blocks = [todo[k:k + batch_size] for k in range(0, len(todo), batch_size)]  # whole encoder batches
        assigned = []
        for r in range(ctx.world_size):
            lo, hi = distributed.shard_range(len(blocks), r, ctx.world_size)
            assigned.append([i for b in blocks[lo:hi] for i in b])
        log.info("caching features of %d images on %d processes (%d each at most)", len(todo), ctx.world_size,
                 max(len(a) for a in assigned))
        cache.encode(encoder, assigned[ctx.rank], paths, cfg, device, precision, reporter, workers, batch_size, part=ctx.rank,
                     description=f"caching features (share {ctx.rank + 1}/{ctx.world_size})")
        distributed.barrier(ctx)
        if len(set(leaders)) > 1:
            _exchange_rows(ctx, cache, leaders, assigned, device)
        merged = dict(known_bad)
        for bad in distributed.all_gather_object(ctx, {i: cache.bad[i] for i in assigned[ctx.rank] if i in cache.bad}):
            merged.update(bad)
        if leader:
            cache.have[:] = True
            cache.bad = merged
            cache.consolidate()
        distributed.barrier(ctx)
    else:
        if leader and known_bad != cache.bad:
            cache.bad = known_bad
            cache.consolidate()
        distributed.barrier(ctx)
    cache.remap()
    cache.reload_progress()
    return cache


def _exchange_rows(ctx: DistContext, cache: FeatureCache, leaders: list[int], assigned: list[list[int]],
                   device: torch.device) -> None:
    """Copy every folder's newly encoded rows into the other folders, leader to leaders, in chunks."""
    import torch.distributed as dist

    heads = sorted(set(leaders))
    group = dist.new_group(heads)  # every rank must take part in making it
    if ctx.rank in heads:
        cache.remap()  # see the rows the other ranks of this folder wrote
        comm = device if device.type == "cuda" else torch.device("cpu")
        per_chunk = max(1, (64 << 20) // cache.row_bytes)
        fd = os.open(cache.data_path, os.O_RDWR)
        try:
            for src in heads:
                rows = sorted(i for r in range(ctx.world_size) if leaders[r] == src for i in assigned[r])
                for k in range(0, len(rows), per_chunk):
                    chunk = rows[k:k + per_chunk]
                    if ctx.rank == src:
                        rows_data = cache.features[torch.tensor(chunk)].contiguous()  # (k, ...) fp16
                        buf = rows_data.view(torch.uint8).reshape(len(chunk), -1).to(comm)  # (k, row bytes)
                    else:
                        buf = torch.empty(len(chunk), cache.row_bytes, dtype=torch.uint8, device=comm)
                    dist.broadcast(buf, src=src, group=group)
                    if ctx.rank != src:
                        cache.write_rows(fd, chunk, buf.view(torch.float16))
            os.fsync(fd)
        finally:
            os.close(fd)
    distributed.barrier(ctx)


def cache_key(cfg: ModelConfig, weights_source: str, precision: str, paths: Sequence[Path],
              fine_tune_blocks: int = 0) -> str:
    """The name of the cache of ``paths``: what the rows hold and of which images. With
    ``fine_tune_blocks`` N > 0 the rows are the output of the part below the top N blocks, so a
    frozen cache and a split one (or two split at different blocks) never mix."""
    h = hashlib.sha1()
    settings = [cfg.encoder, cfg.grid, cfg.image_size, weights_source, precision]
    if fine_tune_blocks:  # not for 0: the frozen caches of earlier runs keep their name
        settings.append({"below_top_blocks": fine_tune_blocks})
    h.update(json.dumps(settings).encode())
    for p in paths:  # a drawing by what is drawn (its repr), not only by its name
        h.update((str(p) if isinstance(p, Path) else repr(p)).encode() + b"\0")
    return h.hexdigest()[:16]
