"""NAO's encoder, performance predictor and decoder (Luo et al., *Neural Architecture Optimization*).

**Architectures as tokens** (:class:`TokenSpace`). A method's choice space is ``{decision:
choices}`` plus forbidden combinations (``Method.forbidden_choices``: DNAT forbids every operand
of a sum choosing none). Decisions that appear together in a forbidden combination are joined
(union-find) into one *position* whose vocabulary is the list of their valid joint choices, so
every token sequence is a valid architecture and an invalid one cannot be written: the decoder's
logits at position t are masked to position t's vocabulary. Validity factorises over positions,
so sampling each position uniformly samples the valid architectures uniformly.

**Model** (:class:`NAOModel`), in the paper's notation, for tokens x = (x_1 .. x_T):

* encoder E: embeddings, then an LSTM; its hidden states normalised to unit L2 norm,
  e_x = (h_1 .. h_T), ‖h_t‖ = 1;
* predictor f: mean pooling ē = (1/T) Σ_t h_t, then an MLP with a sigmoid output (scores are
  min-max normalised to [0, 1] before training);
* decoder D: an LSTM started from (ē, 0), fed the previous token (a start token first), with
  dot-product attention over e_x: c_t = Σ_s softmax_s(o_t·h_s) h_s, logits from
  tanh(W [o_t; c_t]), masked to position t's vocabulary;
* loss L = λ L_pp + (1 − λ) L_rec, L_pp = (f(e_x) − s_x)² (mean), L_rec = −log P_D(x | e_x)
  (teacher forcing, mean per token).

**Optimisation in the embedding** (:meth:`NAOModel.improve`): e' = e_x + η ∂f/∂e_x, decoded
greedily; η starts at ``step`` and grows by 25% until the decoded architecture is one not seen before
(the paper raises η the same way; its exact schedule was lost in the text we have).
"""
from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

Arch = dict  # {decision: choice}


class TokenSpace:
    """The valid architectures of a choice space as fixed-length token sequences (see module docstring).

    ``choices``: ``{decision: (choice, ...)}`` (order kept); ``forbidden``: partial architectures
    no architecture may contain; ``canonical``: maps an architecture to the representative of its
    equivalence class (for :meth:`equivalents`; None: no symmetries)."""

    def __init__(self, choices: dict[str, Sequence[str]], forbidden: Sequence[dict[str, str]] = (),
                 canonical: Callable[[Arch], Arch] | None = None, max_joint: int = 4096):
        self.choices = {d: tuple(c) for d, c in choices.items()}
        self.forbidden = [dict(f) for f in forbidden]
        self.canonical = canonical
        order = list(self.choices)
        parent = {d: d for d in order}

        def find(d):
            while parent[d] != d:
                parent[d] = parent[parent[d]]
                d = parent[d]
            return d

        for bad in self.forbidden:
            ds = [d for d in bad if d in parent]
            for a, b in zip(ds, ds[1:]):
                parent[find(a)] = find(b)
        groups: dict[str, list[str]] = {}
        for d in order:
            groups.setdefault(find(d), []).append(d)
        self.positions: list[tuple[str, ...]] = [tuple(g) for g in sorted(groups.values(), key=lambda g: order.index(g[0]))]
        self.vocab: list[list[tuple[str, ...]]] = []
        for pos in self.positions:
            rules = [f for f in self.forbidden if set(f) <= set(pos)]
            n = 1
            for d in pos:
                n *= len(self.choices[d])
            if n > max_joint:
                raise ValueError(f"decisions {pos} are coupled by forbidden combinations into {n} joint choices "
                                 f"(more than {max_joint})")
            combos = [c for c in itertools.product(*(self.choices[d] for d in pos))
                      if not any(all(dict(zip(pos, c))[d] == v for d, v in f.items()) for f in rules)]
            self.vocab.append(combos)
        self.offsets = [0]
        for v in self.vocab:
            self.offsets.append(self.offsets[-1] + len(v))
        self.n_tokens = self.offsets[-1]
        self.length = len(self.positions)
        self._index = [{c: i for i, c in enumerate(v)} for v in self.vocab]

    def size(self) -> int:
        """The number of valid architectures."""
        n = 1
        for v in self.vocab:
            n *= len(v)
        return n

    def encode(self, arch: Arch) -> list[int]:
        """Token ids (global, position t's ids in ``[offsets[t], offsets[t+1])``)."""
        return [self.offsets[t] + self._index[t][tuple(arch[d] for d in pos)] for t, pos in enumerate(self.positions)]

    def decode(self, tokens: Sequence[int]) -> Arch:
        """The architecture of ``tokens``."""
        arch = {}
        for t, (pos, tok) in enumerate(zip(self.positions, tokens)):
            arch.update(zip(pos, self.vocab[t][int(tok) - self.offsets[t]]))
        return {d: arch[d] for d in self.choices}

    def key(self, arch: Arch) -> tuple:
        """A hashable key of ``arch``."""
        return tuple(arch[d] for d in self.choices)

    def sample(self, rng: random.Random) -> Arch:
        """A valid architecture drawn uniformly."""
        return self.decode([self.offsets[t] + rng.randrange(len(v)) for t, v in enumerate(self.vocab)])

    def valid(self, arch: Arch) -> bool:
        """Whether ``arch`` gives every decision one of its choices and holds no forbidden combination."""
        return set(arch) == set(self.choices) and all(arch[d] in c for d, c in self.choices.items()) and \
            not any(all(arch.get(d) == v for d, v in f.items()) for f in self.forbidden)

    def equivalents(self, arch: Arch, limit: int = 8, rng: random.Random | None = None) -> list[Arch]:
        """Up to ``limit`` other valid architectures equivalent to ``arch`` (the same canonical form;
        NAO's augmentation by symmetric architectures). Empty without ``canonical``."""
        if self.canonical is None or limit <= 0:
            return []
        base = self.canonical(arch)
        free: dict[str, list[str]] = {}
        for d, options in self.choices.items():
            alts = []
            for c in options:
                if c == arch[d]:
                    continue
                other = {**arch, d: c}
                if self.valid(other) and self.canonical(other) == base:
                    alts.append(c)
            if alts:
                free[d] = [arch[d]] + alts
        if not free:
            return []
        names = list(free)
        combos = list(itertools.islice(itertools.product(*(free[d] for d in names)), 1, 1 + 64 * limit))
        rng = rng or random.Random(0)
        picked = rng.sample(combos, min(limit, len(combos)))
        out = [{**arch, **dict(zip(names, c))} for c in picked]
        return [a for a in out if self.valid(a)]


class NAOModel(nn.Module):
    """Encoder (unit-normalised LSTM states), predictor (mean pool → MLP → sigmoid) and attention
    decoder over a :class:`TokenSpace` (see the module docstring)."""

    def __init__(self, space: TokenSpace, embed: int = 32, hidden: int = 64, mlp_hidden: int = 64):
        super().__init__()
        self.space = space
        self.start = space.n_tokens  # the decoder's start token
        self.embedding = nn.Embedding(space.n_tokens + 1, embed)
        self.position = nn.Embedding(max(space.length, 1), embed)
        self.encoder = nn.LSTM(embed, hidden, batch_first=True)
        self.predictor = nn.Sequential(nn.Linear(hidden, mlp_hidden), nn.ReLU(), nn.Linear(mlp_hidden, 1))
        self.decoder = nn.LSTM(embed, hidden, batch_first=True)
        self.combine = nn.Linear(2 * hidden, hidden)
        self.out = nn.Linear(hidden, space.n_tokens)
        mask = torch.full((max(space.length, 1), space.n_tokens), float("-inf"))
        for t in range(space.length):
            mask[t, space.offsets[t]:space.offsets[t + 1]] = 0.0
        self.register_buffer("mask", mask, persistent=False)

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        return self.embedding(tokens) + self.position(pos)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """e_x: (B, T, hidden), every state of unit L2 norm."""
        h, _ = self.encoder(self._embed(tokens))
        return F.normalize(h, dim=-1)

    def predict(self, e: torch.Tensor) -> torch.Tensor:
        """f(e_x) in (0, 1), shape (B,)."""
        return torch.sigmoid(self.predictor(e.mean(1))).squeeze(-1)

    def _logits(self, o: torch.Tensor, e: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        att = torch.softmax(o @ e.transpose(1, 2), dim=-1)  # (B, t, T)
        ctx = att @ e
        return self.out(torch.tanh(self.combine(torch.cat([o, ctx], -1)))) + self.mask[steps]

    def _init_state(self, e: torch.Tensor):
        h0 = e.mean(1).unsqueeze(0).contiguous()
        return h0, torch.zeros_like(h0)

    def reconstruct_logits(self, tokens: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """Teacher-forced decoder logits (B, T, n_tokens), masked per position."""
        prev = torch.cat([torch.full_like(tokens[:, :1], self.start), tokens[:, :-1]], 1)
        o, _ = self.decoder(self._embed(prev), self._init_state(e))
        return self._logits(o, e, torch.arange(tokens.shape[1], device=tokens.device))

    @torch.no_grad()
    def decode(self, e: torch.Tensor) -> torch.Tensor:
        """Greedy decoding of ``e`` (B, T, hidden) into tokens (B, T), each in its position's vocabulary."""
        b, length = e.shape[0], self.space.length
        state = self._init_state(e)
        prev = torch.full((b, 1), self.start, dtype=torch.long, device=e.device)
        out = []
        for t in range(length):
            emb = self.embedding(prev) + self.position.weight[t]
            o, state = self.decoder(emb, state)
            tok = self._logits(o, e, torch.tensor([t], device=e.device)).argmax(-1)
            out.append(tok)
            prev = tok
        return torch.cat(out, 1)

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor, trade_off: float) -> tuple[torch.Tensor, ...]:
        """(L, L_pp, L_rec) for a batch."""
        e = self.encode(tokens)
        l_pp = F.mse_loss(self.predict(e), targets)
        logits = self.reconstruct_logits(tokens, e)
        l_rec = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1))
        return trade_off * l_pp + (1 - trade_off) * l_rec, l_pp, l_rec

    def improve(self, tokens: torch.Tensor, step: float, seen: set, growth: float = 1.25, tries: int = 40
                ) -> list[list[int] | None]:
        """For each row of ``tokens``: e' = e + η ∂f/∂e decoded, η = ``step``·``growth``^i for the
        first i whose decoding is neither in ``seen`` (a set of token tuples) nor found for an
        earlier row; None where none is found."""
        e = self.encode(tokens).detach().requires_grad_(True)
        grad, = torch.autograd.grad(self.predict(e).sum(), e)
        # per architecture, the direction of ∂f/∂e scaled to the norm of e (√T): η is then a
        # fraction of the embedding's size, whatever the predictor's slope
        norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
        grad = grad * (e.detach().flatten(1).norm(dim=1) / norm)[:, None, None]
        etas = step * growth ** torch.arange(tries, dtype=e.dtype)  # every η decoded in one batch
        moved = e.detach()[:, None] + etas[None, :, None, None] * grad[:, None]  # (B, tries, T, H)
        decoded = self.decode(moved.flatten(0, 1)).view(tokens.shape[0], tries, -1).tolist()
        found: list[list[int] | None] = [None] * tokens.shape[0]
        taken = set(seen)
        for i, rows in enumerate(decoded):
            for row in rows:  # the smallest η whose decoding is new
                if tuple(row) not in taken:
                    found[i] = row
                    taken.add(tuple(row))
                    break
        return found


def normalise_scores(scores: Sequence[float]) -> torch.Tensor:
    """Min-max normalisation to [0, 1] (all equal: 0.5)."""
    s = torch.tensor(list(scores), dtype=torch.float32)
    lo, hi = s.min(), s.max()
    return (s - lo) / (hi - lo) if hi > lo else torch.full_like(s, 0.5)


def train_nao(model: NAOModel, tokens: torch.Tensor, targets: torch.Tensor, *, epochs: int, trade_off: float,
              lr: float = 5e-3, batch_size: int = 64, seed: int = 0) -> dict[str, float]:
    """Adam on L = λ L_pp + (1 − λ) L_rec over (tokens, normalised scores); returns the last epoch's losses."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    n = tokens.shape[0]
    last = {}
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        tot = pp = rec = 0.0
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            loss, l_pp, l_rec = model.loss(tokens[idx], targets[idx], trade_off)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            k = len(idx)
            tot, pp, rec = tot + loss.item() * k, pp + l_pp.item() * k, rec + l_rec.item() * k
        last = {"loss": tot / n, "l_pp": pp / n, "l_rec": rec / n}
    model.eval()
    return last


@torch.no_grad()
def reconstruction_accuracy(model: NAOModel, tokens: torch.Tensor) -> float:
    """The fraction of tokens that greedy decoding of E(x) gives back."""
    model.eval()
    return float((model.decode(model.encode(tokens)) == tokens).float().mean())
