"""The losses between two vocabularies (hf_kd.cross_losses) against independent formulas and properties."""

import torch

from hf_kd.cross_losses import hybrid_loss, sorted_distance, uld_loss
from hf_kd.losses import logit_distillation_loss


def test_uld_is_the_l1_distance_of_sorted_probabilities_padded_with_zeros():
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(5, 7, generator=g), torch.randn(5, 4, generator=g)
    T = 2.0
    ps, pt = torch.softmax(zs / T, -1), torch.softmax(zt / T, -1)
    expected = []
    for a, b in zip(ps, pt):
        a, b = sorted(a.tolist(), reverse=True), sorted(b.tolist(), reverse=True) + [0.0] * 3
        expected.append(sum(abs(x - y) for x, y in zip(a, b)))
    mask = torch.tensor([True, True, False, True, True])
    got = uld_loss(zs, zt, mask, temperature=T)
    want = sum(e for e, m in zip(expected, mask) if m) / 4
    assert torch.allclose(got, torch.tensor(want), atol=1e-6)


def test_uld_is_zero_for_a_permuted_vocabulary_and_ignores_masked_garbage():
    z = torch.randn(3, 6)
    perm = torch.randperm(6)
    assert uld_loss(z, z[:, perm]).abs() < 1e-6
    bad = z.clone()
    bad[1] = float("nan")
    mask = torch.tensor([True, False, True])
    zs = torch.randn(3, 6, requires_grad=True)
    loss = uld_loss(zs, bad, mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(zs.grad).all() and zs.grad[1].abs().sum() == 0


def test_hybrid_with_every_token_matched_is_the_forward_kl():
    g = torch.Generator().manual_seed(1)
    zs, zt = torch.randn(2, 5, 9, generator=g), torch.randn(2, 5, 9, generator=g)
    mask = torch.rand(2, 5, generator=g) > 0.3
    ids = torch.arange(9)
    got = hybrid_loss(zs, zt, ids, ids, mask, temperature=1.5, normalizer=7)
    want = logit_distillation_loss(zs, zt, mask, kind="forward_kl", temperature=1.5, normalizer=7)
    assert torch.allclose(got, want, atol=1e-6)


def test_hybrid_splits_matched_kl_and_unmatched_uld():
    g = torch.Generator().manual_seed(2)
    zs, zt = torch.randn(3, 6, generator=g), torch.randn(3, 5, generator=g)
    s_ids, t_ids = torch.tensor([0, 2, 5]), torch.tensor([4, 1, 0])
    ps, pt = torch.softmax(zs, -1), torch.softmax(zt, -1)
    kl = (pt[:, t_ids] * (pt[:, t_ids].log() - ps[:, s_ids].log())).sum(-1)
    rest = sorted_distance(ps[:, [1, 3, 4]], pt[:, [2, 3]])
    assert torch.allclose(hybrid_loss(zs, zt, s_ids, t_ids), (kl + rest).mean(), atol=1e-6)


def test_all_masked_gives_zero_with_a_gradient():
    zs = torch.randn(2, 4, requires_grad=True)
    mask = torch.zeros(2, dtype=torch.bool)
    for loss in (uld_loss(zs, torch.randn(2, 3), mask), hybrid_loss(zs, torch.randn(2, 3), torch.tensor([0]),
                                                                     torch.tensor([1]), mask)):
        assert loss == 0
        loss.backward()
        assert torch.isfinite(zs.grad).all()
