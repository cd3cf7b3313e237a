"""Rejection sampling keeps the target distribution: chi-square tests over
many draws on a small vocabulary (fixed seeds), with a threshold that a
biased verifier fails."""

import torch

from splitserve.engine.sampler import Sampler, SeqSamplingState
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.spec.rejection import rejection_sample

N = 40_000
CHI2_DF5_P001 = 20.515  # chi-square critical value, 5 degrees of freedom, p = 0.001
P = torch.tensor([0.05, 0.30, 0.10, 0.25, 0.20, 0.10])


def chi2(tokens: torch.Tensor, p: torch.Tensor) -> float:
    obs = torch.bincount(tokens, minlength=len(p)).double()
    exp = p.double() * len(tokens)
    return float(((obs - exp) ** 2 / exp).sum())


def draws(seed: int, draft: int, q: torch.Tensor | None = None):
    g = torch.Generator().manual_seed(seed)
    p = P.expand(N, -1)
    d = torch.full((N,), draft, dtype=torch.int64)
    u = torch.rand(N, generator=g)
    noise = torch.empty(N, len(P)).exponential_(generator=g).clamp_min_(1e-12)
    qq = None if q is None else q.expand(N, -1)
    return rejection_sample(p, d, u, noise, qq)


def test_point_mass_draft_keeps_the_target_distribution():
    for draft in (1, 2):  # a likely and an unlikely draft token
        tokens = draws(draft, draft)
        assert chi2(tokens, P) < CHI2_DF5_P001
        accepted = (tokens == draft).double().mean().item()
        assert abs(accepted - P[draft].item()) < 0.01  # P(accept) = p(x) for a point mass


def test_sampled_draft_keeps_the_target_distribution():
    q = torch.tensor([0.40, 0.05, 0.25, 0.05, 0.05, 0.20])
    g = torch.Generator().manual_seed(7)
    drafts = torch.multinomial(q, N, replacement=True, generator=g)
    u = torch.rand(N, generator=g)
    noise = torch.empty(N, len(P)).exponential_(generator=g)
    tokens = rejection_sample(P.expand(N, -1), drafts, u, noise, q.expand(N, -1))
    assert chi2(tokens, P) < CHI2_DF5_P001
    # the acceptance rate is the overlap of the two distributions
    assert abs((tokens == drafts).double().mean().item() - torch.minimum(P, q).sum().item()) < 0.01


def test_the_threshold_rejects_a_biased_verifier():
    q = torch.tensor([0.40, 0.05, 0.25, 0.05, 0.05, 0.20])
    g = torch.Generator().manual_seed(3)
    drafts = torch.multinomial(q, N, replacement=True, generator=g)
    assert chi2(drafts, P) > CHI2_DF5_P001  # accepting every draft samples q, not p
    # resampling from p instead of the residual after a rejection is biased too
    u = torch.rand(N, generator=g)
    accept = u * q[drafts] < P[drafts]
    resampled = torch.multinomial(P, N, replacement=True, generator=g)
    assert chi2(torch.where(accept, drafts, resampled), P) > CHI2_DF5_P001


def test_sampler_verifies_unseeded_rows_and_leaves_seeded_rows_alone():
    n = 8000  # one sampler state per row: fewer rows than above
    logits = P.log().expand(n, -1).contiguous()
    params = SamplingParams(temperature=1.0)
    states = [SeqSamplingState.create(params, [0]) for _ in range(n)]
    for s in states:
        s.draft_token = 2
    tokens, _ = Sampler(seed=11)(logits, states)
    tokens = torch.tensor(tokens)
    assert chi2(tokens, P) < CHI2_DF5_P001
    assert abs((tokens == 2).double().mean().item() - P[2].item()) < 0.015
    # a seeded row's token is its seeded draw, whatever the draft
    seeded = SamplingParams(temperature=1.0, seed=5)
    a, b = SeqSamplingState.create(seeded, [0]), SeqSamplingState.create(seeded, [0])
    b.draft_token = 4
    sampler = Sampler(seed=0)
    assert sampler(logits[:1], [a]) == sampler(logits[:1], [b])
