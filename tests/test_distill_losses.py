"""The draft-LM distillation losses (TVD++ paper): each surrogate's gradient is the gradient of the divergence
it claims, on random inputs, and each check fails on a deliberately wrong surrogate."""

from __future__ import annotations

import pytest
import torch

from specbench.training import losses as L


def _inputs(seed: int, B: int = 3, T: int = 5, V: int = 17):
    g = torch.Generator().manual_seed(seed)
    draft = (torch.randn(B, T, V, generator=g) * 2).requires_grad_(True)
    target = torch.randn(B, T, V, generator=g) * 2
    mask = (torch.rand(B, T, generator=g) > 0.3).float()
    mask[0, 0] = 1.0
    return draft, target, mask


def _grad(loss_fn, draft, target, mask) -> torch.Tensor:
    d = draft.detach().clone().requires_grad_(True)
    loss_fn(d, target, mask).backward()
    return d.grad


def _sigma_position(draft, target) -> torch.Tensor:
    q = torch.softmax(draft.detach(), -1)
    r = (torch.softmax(target, -1) > q).float()
    mu = (q * r).sum(-1, keepdim=True)
    return (mu * (1 - mu)).sqrt()  # r is 0/1: its variance under q


@pytest.mark.parametrize("seed", range(5))
def test_tvd_surrogate_has_the_gradient_of_tvd(seed):
    draft, target, mask = _inputs(seed)
    torch.testing.assert_close(_grad(L.tvd_loss, draft, target, mask), _grad(L.tvd, draft, target, mask),
                               atol=1e-6, rtol=1e-5)


def test_the_tvd_check_catches_a_flipped_reward():
    def flipped(d, t, m):  # reward 1[p < q]
        logq = torch.log_softmax(d, -1)
        q = logq.exp()
        r = (torch.softmax(t, -1) < q.detach()).float()
        return L._masked_mean(-(q.detach() * r * logq).sum(-1), m)

    draft, target, mask = _inputs(0)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(_grad(flipped, draft, target, mask), _grad(L.tvd, draft, target, mask))


@pytest.mark.parametrize("seed", range(5))
def test_tvdpp_per_position_is_tvd_rescaled_by_each_positions_sigma(seed):
    draft, target, mask = _inputs(seed)
    want = _grad(L.tvd, draft, target, mask) / (_sigma_position(draft, target) + 1e-5)
    torch.testing.assert_close(_grad(L.tvdpp_loss, draft, target, mask), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("seed", range(3))
def test_tvdpp_per_batch_is_tvd_rescaled_once(seed):
    draft, target, mask = _inputs(seed)
    q = torch.softmax(draft.detach(), -1)
    r = (torch.softmax(target, -1) > q).float()
    w = mask[..., None] * q
    mu = (w * r).sum() / mask.sum()
    sigma = ((w * (r - mu) ** 2).sum() / mask.sum()).sqrt()
    got = _grad(lambda d, t, m: L.tvdpp_loss(d, t, m, stats="batch"), draft, target, mask)
    torch.testing.assert_close(got, _grad(L.tvd, draft, target, mask) / (sigma + 1e-5), atol=1e-5, rtol=1e-4)


def test_the_tvdpp_check_catches_unweighted_statistics():
    """Mean and std over the vocabulary without q's weights (a third-party reading) is another objective."""
    def unweighted(d, t, m):
        logq = torch.log_softmax(d, -1)
        q = logq.exp().detach()
        r = (torch.softmax(t, -1) > q).float()
        adv = (r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True) + 1e-5)
        return L._masked_mean(-(q * adv * logq).sum(-1), m)

    draft, target, mask = _inputs(1)
    want = _grad(L.tvd, draft, target, mask) / (_sigma_position(draft, target) + 1e-5)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(_grad(unweighted, draft, target, mask), want, atol=1e-5, rtol=1e-4)


def test_kld_has_the_gradient_of_forward_kl():
    draft, target, mask = _inputs(2)

    def kl(d, t, m):
        p = torch.softmax(t, -1)
        return L._masked_mean((p * (torch.log_softmax(t, -1) - torch.log_softmax(d, -1))).sum(-1), m)

    torch.testing.assert_close(_grad(L.kld_loss, draft, target, mask), _grad(kl, draft, target, mask))


def test_unknown_statistics_are_refused():
    draft, target, mask = _inputs(0)
    with pytest.raises(ValueError, match="unknown TVD\\+\\+ statistics 'vocab'; known: position, batch"):
        L.tvdpp_loss(draft, target, mask, stats="vocab")


# -- a reduced draft vocabulary: q over the support's ids, p the target's full distribution restricted to them

def _support_inputs(seed: int, V: int = 17, N: int = 6):
    draft, target, mask = _inputs(seed, V=V)
    support = torch.randperm(V, generator=torch.Generator().manual_seed(seed))[:N]
    return draft[..., :N].detach().clone().requires_grad_(True), target, mask, support


def _embedded(d: torch.Tensor, V: int, support: torch.Tensor) -> torch.Tensor:
    """The draft's logits over the full vocabulary: its support logits, -inf elsewhere (q = 0 there)."""
    full = torch.full((*d.shape[:-1], V), float("-inf"))
    return full.index_copy(-1, support, d)


@pytest.mark.parametrize("seed", range(3))
def test_tvd_over_a_support_is_the_full_vocabulary_tvd_with_q_zero_outside_it(seed):
    draft, target, mask, S = _support_inputs(seed)
    p = torch.softmax(target, -1)
    q = torch.softmax(_embedded(draft.detach(), 17, S), -1)
    want = ((0.5 * (p - q).abs().sum(-1)) * mask).sum() / (mask.sum() + 1e-5)
    torch.testing.assert_close(L.tvd(draft, target, mask, support=S), want)


@pytest.mark.parametrize("seed", range(3))
def test_tvd_surrogate_over_a_support_has_the_gradient_of_its_tvd(seed):
    draft, target, mask, S = _support_inputs(seed)
    got = _grad(lambda d, t, m: L.tvd_loss(d, t, m, support=S), draft, target, mask)
    torch.testing.assert_close(got, _grad(lambda d, t, m: L.tvd(d, t, m, support=S), draft, target, mask),
                               atol=1e-6, rtol=1e-5)


def test_the_support_check_catches_a_renormalised_p():
    """p renormalised over the support (a tempting shortcut) is another divergence with another gradient."""
    def renormalised(d, t, m):
        p = torch.softmax(t, -1).index_select(-1, S)
        p = p / p.sum(-1, keepdim=True)
        return L._masked_mean(0.5 * (p - torch.softmax(d, -1)).abs().sum(-1), m)

    draft, target, mask, S = _support_inputs(0)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(_grad(renormalised, draft, target, mask),
                                   _grad(lambda d, t, m: L.tvd(d, t, m, support=S), draft, target, mask))


@pytest.mark.parametrize("seed", range(3))
def test_tvdpp_over_a_support_is_its_tvd_rescaled_by_each_positions_sigma(seed):
    draft, target, mask, S = _support_inputs(seed)
    q = torch.softmax(draft.detach(), -1)
    r = (torch.softmax(target, -1).index_select(-1, S) > q).float()
    mu = (q * r).sum(-1, keepdim=True)
    sigma = (mu * (1 - mu)).sqrt()
    grad_tvd = _grad(lambda d, t, m: L.tvd(d, t, m, support=S), draft, target, mask)
    got = _grad(lambda d, t, m: L.tvdpp_loss(d, t, m, support=S), draft, target, mask)
    # p < q on the whole support (r = 0: p's mass outside S is large) happens here, unlike over the full
    # vocabulary: TVD's gradient is then exactly 0 (1/2 sum_S grad q), and TVD++'s too, while the reference's
    # float rounding (~1e-10) divided by eps is not; those positions are checked for zero instead.
    flat = sigma[..., 0] == 0
    torch.testing.assert_close(got[~flat], grad_tvd[~flat] / (sigma[~flat] + 1e-5), atol=1e-5, rtol=1e-4)
    assert torch.equal(got[flat], torch.zeros_like(got[flat]))
    torch.testing.assert_close(grad_tvd[flat], torch.zeros_like(grad_tvd[flat]), atol=1e-8, rtol=0)


def test_kld_over_a_support_has_the_gradient_of_kl_to_p_renormalised_there_times_its_mass():
    draft, target, mask, S = _support_inputs(2)

    def scaled_kl(d, t, m):
        p = torch.softmax(t, -1).index_select(-1, S)
        mass = p.sum(-1, keepdim=True)
        pn = p / mass
        return L._masked_mean((mass * pn * (pn.log() - torch.log_softmax(d, -1))).sum(-1), m)

    torch.testing.assert_close(_grad(lambda d, t, m: L.kld_loss(d, t, m, support=S), draft, target, mask),
                               _grad(scaled_kl, draft, target, mask))


@pytest.mark.parametrize("name", ["kld_loss", "tvd_loss", "tvdpp_loss", "tvd"])
def test_the_supports_logits_with_the_full_logsumexp_give_the_full_vocabularys_losses(name):
    """The drafter's training route: S's target logits and the cached logsumexp of all of them stand for the full
    vocabulary's logits (values and gradients), while S's logits renormalised among themselves do not."""
    draft, target, mask, S = _support_inputs(5)
    fn = getattr(L, name)
    lse = torch.logsumexp(target, -1)
    want = fn(draft, target, mask, support=S)
    got = fn(draft, target.index_select(-1, S), mask, support=S, target_lse=lse)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(_grad(lambda d, t, m: fn(d, t.index_select(-1, S), m, support=S, target_lse=lse),
                                     draft, target, mask),
                               _grad(lambda d, t, m: fn(d, t, m, support=S), draft, target, mask))
    wrong = torch.logsumexp(target.index_select(-1, S), -1)  # the normaliser of S's logits only
    assert not torch.allclose(fn(draft, target.index_select(-1, S), mask, support=S, target_lse=wrong), want)
