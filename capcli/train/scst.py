"""Self-critical sequence training (Rennie et al., CVPR 2017): REINFORCE with CIDEr-D as the reward.

For each image, K captions are sampled from the model (multinomial, through ``Decoder.step``, all
B x K rows in one batch); each is rewarded by its CIDEr-D against the image's references; the loss
pushes up the log-probability of the samples that beat a baseline and down those that do not:

    loss = - sum_i (r_i - b_i) * sum_t log p(w_it)  /  number of sampled tokens

Baselines: ``mean`` (default), the mean reward of the image's other K-1 samples (Luo, "A better
variant of self-critical sequence training", arXiv 2003.09971: no extra decoding, and unbiased
since b_i does not depend on sample i); ``greedy``, the reward of the image's greedy caption (the
paper's original).

The reward sees captions as word tokens followed by ``<end>`` ("CIDEr-D with eos", as in Luo's
self-critical.pytorch): references get ``<end>`` appended, a sample gets it when it ended. So
n-grams at the end of a sentence count ("on the grass <end>"), and a caption that stops mid-phrase
("a dog runs on the") earns less than one that ends where references end; without it SCST learns
to cut sentences short after the words that score.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from capcli.infer.decode import caption_log_probs, greedy
from capcli.metrics.cider import CiderD, document_frequencies, fingerprint, load_document_frequencies, save_document_frequencies
from capcli.model.decoder import Decoder
from capcli.runtime import distributed
from capcli.runtime.devices import autocast
from capcli.text.tokenizers import tokenize
from capcli.text.vocab import END, PAD, START

if TYPE_CHECKING:
    from capcli.train.objective import StepContext

END_TOKEN = "<end>"  # the word tokenizer never makes it (no "<" or ">" in a word)
DF_FILE = "cider-df.json"


@dataclass
class Samples:
    """K sampled captions per image, rows image-major: row i*K + k is image i's k-th sample."""

    tokens: torch.Tensor  # (N, T) word ids, <end> included where a caption ended, <pad> after
    logprobs: torch.Tensor  # (N, T) log-probability of each sampled token (with its graph), 0 past the end
    mask: torch.Tensor  # (N, T) True at the sampled tokens (<end> included)
    entropy: torch.Tensor  # (N, T) entropy of the distribution each token was drawn from, detached, 0 past the end
    ended: torch.Tensor  # (N,) True where the caption ended with <end> (False: cut at max_len)


def sample(decoder: Decoder, features: torch.Tensor, k: int, max_len: int,
           generator: torch.Generator | None = None) -> Samples:
    """K multinomial samples per image. features (B, L, D) -> Samples of B*K rows.

    Rows that have ended keep being decoded (their tokens are ignored) until a quarter of the
    batch has ended, then leave it: each shrink copies the features, which backward keeps alive,
    so shrinking at every ended row (as greedy does) would hold up to max_len copies.
    """
    B, dev = features.size(0), features.device
    N = B * k
    state = decoder.init_state(features).select(torch.arange(B, device=dev).repeat_interleave(k))  # N rows
    rows = torch.arange(N, device=dev)  # (n,) sample index of each decoded row
    running = torch.ones(N, dtype=torch.bool, device=dev)  # (n,) not ended yet
    words = torch.full((N,), START, dtype=torch.long, device=dev)  # (n,)
    tokens, logprobs, entropies, masks = [], [], [], []
    for _ in range(max_len):
        logits, state, _ = decoder.step(state, words)  # (n, V)
        logp = caption_log_probs(logits)  # (n, V)
        probs = logp.detach().exp()  # (n, V)
        words = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (n,)
        chosen = logp.gather(1, words.unsqueeze(1)).squeeze(1)  # (n,)
        live = rows[running]  # (m,) samples still writing
        tokens.append(torch.full((N,), PAD, dtype=torch.long, device=dev).index_put((live,), words[running]))  # (N,)
        logprobs.append(logp.new_zeros(N).index_put((live,), chosen[running]))  # (N,)
        entropies.append(logp.new_zeros(N).index_put((live,), torch.special.entr(probs[running]).sum(1)))  # (N,)
        masks.append(torch.zeros(N, dtype=torch.bool, device=dev).index_put((live,), torch.ones_like(live, dtype=torch.bool)))
        running = running & (words != END)  # (n,)
        n_running = int(running.sum())
        if n_running == 0:
            break
        if n_running <= 0.75 * running.numel():
            rows, words, state, running = rows[running], words[running], state.select(running), running[running]
    mask = torch.stack(masks, 1)  # (N, T)
    token_ids = torch.stack(tokens, 1)  # (N, T)
    ended = (token_ids == END).any(1)  # (N,)
    return Samples(token_ids, torch.stack(logprobs, 1), mask, torch.stack(entropies, 1), ended)


def mean_of_others(rewards: torch.Tensor) -> torch.Tensor:
    """rewards (B, K) -> baselines (B, K): each sample's is the mean reward of its image's other K-1 samples."""
    K = rewards.size(1)
    return (rewards.sum(1, keepdim=True) - rewards) / (K - 1)  # (B, K)


def loss(samples: Samples, advantage: torch.Tensor, total_tokens: float | None = None, scale: float = 1.0) -> torch.Tensor:
    """REINFORCE with a baseline: -(r - b) * log p of every sampled token, summed, over the token count.

    advantage (N,) = reward - baseline, no gradient. ``total_tokens`` (default: this batch's) is the
    global batch's count under DDP, and ``scale`` the number of ranks: as in model.caption_loss,
    DDP's gradient average is then the global batch's gradient.
    """
    n_tokens = total_tokens if total_tokens is not None else float(samples.mask.sum())
    weighted = advantage.detach().to(samples.logprobs.dtype).unsqueeze(1) * samples.logprobs  # (N, T)
    return -weighted.sum() / max(n_tokens, 1.0) * scale


def shuffled_image_batches(images: Sequence[int], per_step: int, generator: torch.Generator) -> list[list[int]]:
    """The SCST phase's batches: the train images in random order, ``per_step`` at a time."""
    perm = torch.randperm(len(images), generator=generator).tolist()
    order = [images[i] for i in perm]
    return [order[k:k + per_step] for k in range(0, len(order), per_step)]


# --------------------------------------------------------------------------- the reward

def reference_tokens(captions: Sequence[str]) -> list[list[str]]:
    """An image's references as the reward sees them: word tokens, then <end>."""
    return [tokenize(c, "word") + [END_TOKEN] for c in captions]


def train_document_frequencies(run_dir: Path, train_captions: Sequence[Sequence[str]]) -> tuple[dict, int]:
    """(df, images) of the train split's references, from the run folder's cache or counted (and cached).

    ``train_captions`` holds, per train image, its captions; nothing of val or test may be in it:
    a df that counts the evaluation references would reward n-grams by how rare they are there.
    """
    refs = [reference_tokens(c) for c in train_captions]
    key = fingerprint(refs)
    path = Path(run_dir) / DF_FILE
    cached = load_document_frequencies(path, key)
    if cached is not None:
        return cached
    df, images = document_frequencies(refs)
    save_document_frequencies(path, df, images, key, note=f"CIDEr-D document frequencies of the train split's references "
                                                             f"(word tokens + {END_TOKEN}), {images} images")
    return df, images


class CiderReward:
    """Rewards of sampled captions: CIDEr-D against their image's references, with <end>."""

    def __init__(self, scorer: CiderD, words: Sequence[str], captions_of: Callable[[int], Sequence[str]]):
        self.scorer, self.words, self.captions_of = scorer, words, captions_of

    def caption_words(self, ids: Sequence[int], ended: bool) -> list[str]:
        return [self.words[i] for i in ids if i != END and i != PAD] + ([END_TOKEN] if ended else [])

    def __call__(self, images: Sequence[int], captions: Sequence[tuple[Sequence[int], bool]]) -> list[float]:
        """images[i]'s captions are captions[i*K:(i+1)*K], K = len(captions) // len(images);
        each is (word ids, ended with <end>). Returns one reward per caption."""
        K = len(captions) // max(len(images), 1)
        rewards = []
        for i, image in enumerate(images):
            refs = self.scorer.prepare(reference_tokens(self.captions_of(image)))
            seen: dict[tuple, float] = {}  # samples of one image often repeat
            for ids, ended in captions[i * K:(i + 1) * K]:
                key = (tuple(ids), ended)
                if key not in seen:
                    seen[key] = self.scorer.score(self.caption_words(ids, ended), refs)
                rewards.append(seen[key])
        return rewards

    def of_samples(self, images: Sequence[int], samples: Samples) -> torch.Tensor:
        """(N,) float32 rewards of ``sample``'s output, on the CPU."""
        rows = samples.tokens.masked_fill(~samples.mask, PAD).tolist()
        return torch.tensor(self(images, list(zip(rows, samples.ended.tolist()))), dtype=torch.float32)


# --------------------------------------------------------------------------- the objective

class SelfCritical:
    """The self-critical objective: batches of --batch-size // K train images (rows of the source),
    K samples each, rewarded by CIDEr-D; under DDP each process samples for its slice.

    The loss is divided by the global batch's token count (one all-reduce: it is known only once
    the captions are sampled) and scaled by the number of processes, so DDP's average is the
    global batch's gradient, as in cross-entropy training."""

    phase = "scst"

    def __init__(self, run: "StepContext", images: Sequence[int], reward: CiderReward, max_len: int):
        self.run, self.images, self.reward, self.max_len = run, sorted(set(images)), reward, max_len

    def batches(self, generator: torch.Generator) -> list[list[int]]:
        cfg = self.run.cfg
        return shuffled_image_batches(self.images, max(1, cfg.batch_size // cfg.scst_samples), generator)

    def step(self, batch: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        run = self.run
        cfg, ctx, K = run.cfg, run.ctx, run.cfg.scst_samples
        # This process's part of the batch (image rows), less the unreadable images.
        local_rows = distributed.shard_batch(batch, ctx.rank, ctx.world_size) if ctx.enabled else batch
        inputs = run.source.load(sorted(set(local_rows)))
        local_rows = [i for i in local_rows if i in inputs.loaded_rows]
        has_rows = bool(local_rows)
        if not has_rows:  # nothing to train on here: join the all-reduces with a zero-weight image
            local_rows = batch[:1]
            inputs = run.source.placeholder(batch[0])
        with autocast(run.device, run.precision):
            x, rows = inputs.inputs_for_rows(local_rows)  # (B, L, D), or images and the row of each
            samples, features = run.net(x, rows, lambda decoder, f: sample(decoder, f, K, self.max_len))
        t0 = time.time()
        rewards = self.reward.of_samples(local_rows, samples)  # (B*K,)
        reward_seconds = time.time() - t0  # what CIDEr-D costs, for the benchmark
        if cfg.scst_baseline == "greedy":
            run.decoder.eval()  # the test-time caption: no dropout
            with torch.no_grad(), autocast(run.device, run.precision):
                hyps = greedy(run.decoder, features.detach(), max_len=self.max_len)
            run.decoder.train()
            t0 = time.time()
            baseline = torch.tensor(self.reward(local_rows, [(h.tokens, h.finished) for h in hyps])).repeat_interleave(K)
            reward_seconds += time.time() - t0
        else:
            baseline = mean_of_others(rewards.view(-1, K)).view(-1)  # (B*K,)
        n_tokens = int(samples.mask.sum())
        entropy = float(samples.entropy.sum())
        totals = torch.tensor([n_tokens, float(rewards.sum()), entropy, rewards.numel()],
                              dtype=torch.float64) * float(has_rows)  # (4,); zeros from a zero-weight step
        totals = distributed.all_reduce_sum(ctx, totals.to(run.device)).tolist()  # (4,) over the global batch
        loss_value = loss(samples, (rewards - baseline).to(run.device), total_tokens=totals[0],
                          scale=ctx.world_size * float(has_rows))
        return loss_value, {"tokens": int(totals[0]), "reward": totals[1], "entropy": totals[2],
                            "captions": int(totals[3]), "reward_seconds": reward_seconds}

    def progress(self, sums: dict) -> dict[str, float]:
        return {"reward": sums.get("reward", 0.0) / max(sums.get("captions", 0), 1),
                "entropy": sums.get("entropy", 0.0) / max(sums.get("tokens", 0), 1)}

    def summary(self, sums: dict) -> tuple[dict, float, str]:
        reward, entropy = self.progress(sums)["reward"], self.progress(sums)["entropy"]
        record = {"train_reward": reward, "train_entropy": entropy, "reward_seconds": sums.get("reward_seconds", 0.0)}
        return record, reward, f"train reward {reward:.4f}, entropy {entropy:.3f}"  # no val images: by the mean reward
