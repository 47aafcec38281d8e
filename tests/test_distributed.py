"""Training under torchrun (DistributedDataParallel) on the CPU with gloo, 2 processes, the synthetic shapes set.

The processes are real: torchrun (``python -m torch.distributed.run``), or two ``capcli train``
started by hand with the environment torchrun would give them, or torch.multiprocessing.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from capcli.runtime import distributed
from capcli.runtime.distributed import DistContext, shard_batch, shard_range
from capcli.model.decoder import Decoder
from capcli.model.config import ModelConfig
from capcli.train.losses import caption_loss
from capcli.train.features import length_bucketed_batches
from capcli.train.xe import collate
from conftest import SMALL

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo")

# Dropout 0 (the last --dropout wins): dropout masks are random per process, and the comparison
# with a single process needs the same arithmetic.
TRAIN = ["--batch-size", "16", "--lr", "3e-3", "--min-freq", "1", "--split", "80/20/0", "--device", "cpu",
         "--save-every", "0", "--label-smoothing", "0.1", *SMALL, "--dropout", "0"]
IMAGES = 48  # make_shapes_dataset: 4 colours x 2 shapes x 6


def _env(**extra) -> dict:
    env = dict(os.environ)
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "CAPCLI_DEBUG_SYNC_CHECK"):
        env.pop(k, None)
    env.update({"OMP_NUM_THREADS": "1", "CAPCLI_DIST_TIMEOUT": "60", **extra})  # never hang a test for long
    return env


def _capcli(args: list[str], env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "capcli", *args], capture_output=True, text=True,
                          env=env or _env(), timeout=timeout)


def _torchrun(args: list[str], env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "capcli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env or _env(), timeout=timeout)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- in one process

def test_shard_losses_add_up_to_the_gradient_of_the_global_batch():
    """Each rank's loss, normalised by the GLOBAL word and caption counts and scaled by the number of
    ranks, gives DDP's gradient average = the single-process gradient (label smoothing and attention
    penalty included); a rank with nothing to do contributes an exact zero."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=12, feature_dim=6, embed_dim=5, attention_dim=4, decoder_dim=7, dropout=0.0)
    decoder = Decoder(cfg)
    tokens = [[1, 5, 6, 7, 8, 2], [1, 4, 2], [1, 9, 10, 2], [1, 11, 5, 6, 2], [1, 7, 2]]
    features = torch.randn(len(tokens), 3, 6)  # (N, L, D)
    kw = dict(label_smoothing=0.1, attention_reg=1.0)

    def grads(ids: list[int], scale: float, totals: bool) -> list[torch.Tensor]:
        decoder.zero_grad()
        padded, lengths, order = collate([tokens[i] for i in ids], torch.device("cpu"))
        logits, alphas = decoder(features[[ids[i] for i in order]], padded, lengths)
        extra = dict(total_words=sum(len(tokens[i]) - 1 for i in range(len(tokens))), total_captions=len(tokens)) if totals else {}
        loss, _, _ = caption_loss(logits, alphas, padded, lengths, **kw, **extra, scale=scale)
        loss.backward()
        return [p.grad.clone() for p in decoder.parameters()]

    whole = grads(list(range(5)), 1.0, totals=False)
    world = 2
    shards = [grads(shard_batch(list(range(5)), r, world), world, totals=True) for r in range(world)]
    ddp = [sum(g) / world for g in zip(*shards)]  # what DDP's all-reduce averages to
    for a, b in zip(whole, ddp):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    zero = grads([0], 0.0, totals=True)
    assert all(torch.count_nonzero(g) == 0 for g in zero)


@pytest.mark.parametrize("world", [2, 3])
def test_sampler_gives_each_rank_a_disjoint_bucketed_share_reshuffled_every_epoch(world):
    lengths = [3 + (i * 7) % 11 for i in range(101)]

    def make(epoch: int) -> list[list[int]]:
        return length_bucketed_batches(lengths, 16, torch.Generator().manual_seed(epoch))

    def share(rank: int, epoch: int) -> list[list[int]]:
        return [shard_batch(b, rank, world) for b in make(epoch)]

    for epoch in (1, 2):
        global_batches = make(epoch)
        shares = [share(r, epoch) for r in range(world)]
        for step, batch in enumerate(global_batches):
            parts = [share[step] for share in shares]
            assert sorted(i for p in parts for i in p) == sorted(batch)  # together: the single-process batch
            assert sum(len(p) for p in parts) == len(set(i for p in parts for i in p))  # disjoint
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
        seen = sorted(i for share in shares for b in share for i in b)
        assert seen == list(range(len(lengths)))  # every caption once per epoch
    assert share(0, 1) != share(0, 2)  # reshuffled per epoch
    assert share(1, 2) == share(1, 2)  # seeded: the same on every call, so on every rank
    assert [shard_range(10, r, 4) for r in range(4)] == [(0, 3), (3, 6), (6, 8), (8, 10)]


# --------------------------------------------------------------------------- torch.multiprocessing

class _MeanPoolEncoder(torch.nn.Module):
    """A stand-in encoder: 2x2 mean-pooled pixels -> features (B, 4, 3); counts the images it sees."""

    def __init__(self):
        super().__init__()
        self.images = 0

    def forward(self, x):
        self.images += x.size(0)
        return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(2).transpose(1, 2)


def _cache_worker(rank: int, world: int, store: str, dirs: list[str], image_paths: list[str], out: str):
    from capcli.model.config import ModelConfig
    from capcli.progress import Reporter
    from capcli.train.feature_cache import build_feature_cache

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=__import__("datetime").timedelta(seconds=60))
    ctx = DistContext(rank=rank, world_size=world, local_rank=rank, local_world_size=world, backend="gloo")
    mcfg = ModelConfig(vocab_size=10, image_size=64)
    results = {}
    for case, directory in (("shared folder", dirs[0]), ("own folders", dirs[1 + rank])):
        encoder = _MeanPoolEncoder()
        leaders = distributed.storage_leaders(ctx, Path(directory))
        cache = build_feature_cache(ctx, Path(directory), "k", (len(image_paths), 4, 3), encoder,
                                    [Path(p) for p in image_paths], mcfg, torch.device("cpu"), "fp32", Reporter(), 1, 4)
        results[case] = {"leaders": leaders, "encoded": encoder.images, "bad": sorted(cache.bad),
                         "done": cache.done, "features": cache.features.float().tolist()}
    # The sync check must notice a difference between the ranks, and be quiet without one.
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    distributed.check_in_sync(ctx, net, "same")
    if rank == 1:
        with torch.no_grad():
            net.bias[0] += 1e-6
    try:
        distributed.check_in_sync(ctx, net, "perturbed")
        results["perturbed"] = None
    except Exception as e:
        results["perturbed"] = str(e)
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def test_feature_cache_is_encoded_once_across_ranks_and_completed_in_every_folder(shapes_dir, tmp_path):
    """Each rank encodes its own share of the images; in one shared folder they fill one file, in
    folders of their own (machines without a shared disk) each folder still ends up complete;
    an unreadable image is known to every rank. Also: the parameter sync check detects a difference."""
    import torch.multiprocessing as mp

    images = sorted(str(p) for p in (shapes_dir / "Images").glob("*.png"))
    assert len(images) == IMAGES
    paths = images[:21] + [str(tmp_path / "missing.png")] + images[21:]  # 49 images, one unreadable
    dirs = [str(tmp_path / "shared"), str(tmp_path / "node0"), str(tmp_path / "node1")]
    mp.spawn(_cache_worker, args=(2, str(tmp_path / "store"), dirs, paths, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))

    from capcli.data.images import image_to_tensor, load_image

    def expected(p):
        x = image_to_tensor(load_image(p, draft_size=64), 64, (0.5,) * 3, (0.5,) * 3)
        return _MeanPoolEncoder()(x[None])[0].half().float()

    want = torch.stack([expected(p) if i != 21 else torch.zeros(4, 3) for i, p in enumerate(paths)])
    for case, leaders in (("shared folder", [0, 0]), ("own folders", [0, 1])):
        for r in (r0, r1):
            got = r[case]
            assert got["leaders"] == leaders, case
            assert got["done"] == len(paths) and got["bad"] == [21], case
            torch.testing.assert_close(torch.tensor(got["features"]), want, atol=2e-3, rtol=0)  # complete, right rows
        assert r0[case]["encoded"] + r1[case]["encoded"] == len(paths) - 1, case  # every image once, in all
        assert r0[case]["encoded"] > 0 and r1[case]["encoded"] > 0, case
    for d in dirs:
        record = json.loads(next(Path(d).glob("features-k.json")).read_text())
        assert record["done"] == len(paths) and list(record["bad"]) == ["21"]
        assert not list(Path(d).glob("features-k.part-*")) and not list(Path(d).glob(".capcli-probe-*"))
    assert all(r["perturbed"] and "rank 1 differ" in r["perturbed"] for r in (r0, r1))  # every rank stops


# --------------------------------------------------------------------------- torchrun

def test_two_processes_train_like_one_process_with_the_same_global_batch_and_resume(shapes_dir, tmp_path):
    """torchrun, 2 gloo processes, --batch-size 16 global: finishes; parameters identical on both
    ranks after every step (CAPCLI_DEBUG_SYNC_CHECK); the first epoch's losses and weights are those
    of one process with --batch-size 16; the feature cache is encoded half by each rank; only rank 0
    writes metrics, checkpoints and the result line; --resume under torchrun ends with exactly the
    weights of an uninterrupted torchrun run.

    Only the first epoch is compared with one process: the two sum the gradient in a different
    order, and Adam amplifies that rounding noise step by step (measured: relative loss difference
    8e-7 after epoch 1, 3e-5 after epoch 2, 1e-4 after epoch 3), so later epochs drift apart
    without anything being wrong."""
    one, two, straight = tmp_path / "one", tmp_path / "two", tmp_path / "straight"
    single = _capcli(["train", "--data", str(shapes_dir), "-o", str(one), "--epochs", "1", *TRAIN])
    assert single.returncode == 0, single.stderr

    run = _torchrun(["train", "--data", str(shapes_dir), "-o", str(two), "--epochs", "1", *TRAIN],
                    env=_env(CAPCLI_DEBUG_SYNC_CHECK="1"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines() == [run.stdout.strip()] and run.stdout.startswith(str(two / "best.safetensors"))
    err = run.stderr
    assert "distributed: 2 processes on 1 machine(s), gloo on cpu; global batch 16 captions" in err
    assert "8 per process" in err and "learning rate 0.003 as given" in err
    assert "sync check: the parameters of all 2 processes were identical after each of" in err
    checked = int(err.split("identical after each of ")[1].split()[0])
    per_epoch = -(-json.loads(_meta_training(one / "last.safetensors"))["train_captions"] // 16)
    assert checked == per_epoch
    assert f"caching features of {IMAGES} images on 2 processes ({IMAGES // 2} each at most)" in err
    assert f"cached features of {IMAGES // 2} images" in err  # rank 0 encoded its half
    (f1,), (f2,) = one.glob("features-*.f16"), two.glob("features-*.f16")
    assert f1.name == f2.name and f1.read_bytes() == f2.read_bytes()  # same batches of 4, same numbers
    assert json.loads(f2.with_suffix(".json").read_text()) == {"done": IMAGES, "bad": {}}

    (m1,), (m2,) = _metrics(one), _metrics(two)  # one line each: rank 0 alone writes
    for key in ("train_loss", "val_loss"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-5), key
    assert m2["lr"] == m1["lr"] and m2["best"] == m1["best"]
    # Weights: close as a whole, tensor by tensor. Not element by element: where a weight's true
    # gradient is ~0, what remains is rounding noise, and Adam scales any gradient to a step of
    # about the learning rate, so single elements may differ by a few 1e-4.
    w1, w2 = _weights(one / "last.safetensors"), _weights(two / "last.safetensors")
    assert w1.keys() == w2.keys()
    for k in w1:
        if w1[k].is_floating_point():
            assert float((w2[k] - w1[k]).norm()) <= 1e-3 * float(w1[k].norm()) + 1e-6, k

    again = _torchrun(["train", "--resume", str(two), "--epochs", "2"], env=_env(CAPCLI_DEBUG_SYNC_CHECK="1"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming" in again.stderr and "after epoch 1" in again.stderr
    uninterrupted = _torchrun(["train", "--data", str(shapes_dir), "-o", str(straight), "--epochs", "2", *TRAIN])
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    assert [m["epoch"] for m in _metrics(two)] == [1, 2]
    assert [m["train_loss"] for m in _metrics(two)] == [m["train_loss"] for m in _metrics(straight)]
    w2, w3 = _weights(two / "last.safetensors"), _weights(straight / "last.safetensors")
    for k in w3:
        assert torch.equal(w2[k], w3[k]), k
    assert not list(two.glob("features-*.part-*"))


def _meta_training(path: Path) -> str:
    from capcli.model.files import read_metadata

    return read_metadata(path)["training"]


@pytest.mark.parametrize("how", ["killed", "hung"])
def test_a_dead_or_hung_rank_stops_the_other_with_a_clear_error(shapes_dir, tmp_path, how):
    """Two ranks started as torchrun would start them; rank 1 is killed (SIGKILL) or frozen (SIGSTOP)
    mid-training. Rank 0 must exit 1 with a one-line explanation, after at most the collective
    timeout (CAPCLI_DIST_TIMEOUT=5 here), not hang."""
    run = tmp_path / "run"
    args = ["-m", "capcli", "train", "--data", str(shapes_dir), "-o", str(run), "--epochs", "500", "--patience", "500", *TRAIN]
    port = _free_port()
    procs = []
    try:
        for rank in (1, 0):
            env = _env(CAPCLI_DIST_TIMEOUT="5", WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            procs.append(subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        rank1, rank0 = procs
        deadline = time.time() + 180
        while not (run / "metrics.jsonl").exists():  # an epoch done: they are training together
            assert rank0.poll() is None and rank1.poll() is None, rank0.stderr.read() if rank0.poll() is not None else rank1.stderr.read()
            assert time.time() < deadline, "training did not start"
            time.sleep(0.2)
        os.kill(rank1.pid, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        t0 = time.time()
        out, err = rank0.communicate(timeout=60)
        waited = time.time() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert rank0.returncode == 1, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("capcli: distributed training stopped on rank 0 of 2: another process died, hung or cannot be reached"), err[-2000:]
    assert "CAPCLI_DIST_TIMEOUT" in last and f"--resume {run}" in last and "Traceback" not in err
    if how == "hung":
        assert "Timed out" in last or "timed out" in last.lower()
        assert 4 < waited < 40
    else:
        assert waited < 40


@pytest.mark.parametrize("raw", [
    "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Application timeout caused pair closure",  # seen in CI
    "[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 5000ms for recv operation to complete",
])
def test_a_timeout_is_called_one_whichever_wording_gloo_uses(monkeypatch, raw):
    monkeypatch.setenv("CAPCLI_DIST_TIMEOUT", "5")
    exc = RuntimeError(raw)
    assert distributed.is_failure(exc)
    message = distributed.failure_message(DistContext(rank=0, world_size=2, local_rank=0), exc, "/runs/a")
    assert "timed out" in message.lower() and "pair.cc" not in message and "unbound_buffer" not in message
    assert "at most 5 s (CAPCLI_DIST_TIMEOUT)" in message and message.endswith("--resume /runs/a")


@pytest.mark.parametrize("joined", [False, True])
def test_a_process_that_joined_a_group_ends_without_interpreter_shutdown(tmp_path, joined):
    """A torchrun worker skips Python's shutdown, where a Gloo thread still held by DDP can abort the
    process (SIGABRT after a finished run); its output and exit code are what they would be anyway."""
    marker = tmp_path / "shutdown-ran"
    script = (f"import atexit, pathlib, sys\n"
              f"from capcli import cli\nfrom capcli.runtime import distributed\n"
              f"atexit.register(lambda: pathlib.Path({str(marker)!r}).write_text('yes'))\n"
              f"distributed._joined = {joined}\n"
              f"sys.argv = ['capcli', *sys.argv[1:]]\n"
              f"cli.main()\n")
    ok = subprocess.run([sys.executable, "-c", script, "build-vocab", "--help"], capture_output=True, text=True,
                        env=_env(), timeout=120)
    assert ok.returncode == 0 and "--min-freq" in ok.stdout  # block-buffered into a pipe: flushed before leaving
    assert marker.exists() is not joined
    marker.unlink(missing_ok=True)
    bad = subprocess.run([sys.executable, "-c", script, "build-vocab", "--data", str(tmp_path / "nowhere"), "-o",
                          str(tmp_path / "v.json")], capture_output=True, text=True, env=_env(), timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("capcli: ")
    assert str(tmp_path / "nowhere") in bad.stderr
    assert marker.exists() is not joined


def test_sigterm_under_torchrun_stops_every_rank_at_one_step_and_resumes_exactly(shapes_dir, tmp_path):
    """SLURM's time limit or preemption: SIGTERM to every process of the job (torchrun and its
    workers). The ranks agree on one step to stop at, rank 0 saves a whole checkpoint after the
    signal, every worker exits 143, and --resume under torchrun ends with the weights of a run
    never stopped. (Before, the workers died where they stood: nothing saved since the epoch's end.)"""
    run, straight = tmp_path / "run", tmp_path / "straight"
    args = ["train", "--data", str(shapes_dir), "--epochs", "3", *TRAIN, "--batch-size", "4"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "capcli"]
    proc = subprocess.Popen([*cmd, *args, "-o", str(run)], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        deadline = time.time() + 180
        while not (run / "metrics.jsonl").exists():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.time() < deadline, "training did not start"
            time.sleep(0.05)
        signalled = time.time()
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stops = [line for line in err.splitlines() if line.startswith("capcli: interrupted")]
    assert len(stops) == 2, err[-3000:]  # one line from each rank
    main = next(line for line in stops if "rank 1" not in line)
    assert " by SIGTERM; saved " in main and f"--resume {run}" in main, main
    assert any("by SIGTERM (rank 1; rank 0 saved the checkpoint)" in line for line in stops), stops
    assert "Traceback" not in "\n".join(line for line in err.splitlines() if "capcli" in line)
    assert (run / "last.safetensors").stat().st_mtime >= signalled
    assert not list(run.glob(".*.tmp")) and len(list(run.glob("last.state-*.pt"))) == 1

    again = _torchrun(["train", "--resume", str(run)])
    assert again.returncode == 0, again.stderr[-3000:]
    uninterrupted = _torchrun([*args, "-o", str(straight)])
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    assert [m["epoch"] for m in _metrics(run)] == [1, 2, 3]
    w1, w2 = _weights(run / "last.safetensors"), _weights(straight / "last.safetensors")
    for k in w2:
        assert torch.equal(w1[k], w2[k]), k
