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

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from capcli.cider import CiderD, document_frequencies, fingerprint, load_document_frequencies, save_document_frequencies
from capcli.model import Decoder
from capcli.sampling import BANNED
from capcli.tokenizers import tokenize
from capcli.vocab import END, PAD, START

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


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """The policy: log-softmax over the tokens a caption may hold (never <pad>, <start> or <unk>)."""
    banned = torch.zeros(logits.size(-1), dtype=torch.bool, device=logits.device)
    banned[list(BANNED)] = True
    return torch.log_softmax(logits.float().masked_fill(banned, float("-inf")), dim=-1)  # (n, V)


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
        logp = log_probs(logits)  # (n, V)
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


def image_batches(images: Sequence[int], per_step: int, generator: torch.Generator) -> list[list[int]]:
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
