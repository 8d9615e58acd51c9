"""Tests of the shared GAN pieces: EMA, R1, WGAN-GP, DiffAugment, data order, grids."""
import pytest
import torch
from PIL import Image
from torch import nn

from models.gan import (EpochSampler, diff_augment, gradient_penalty, infinite_loader, make_ema,
                        r1_penalty, save_image_grid)


def test_ema_first_update_is_weighted_average():
    torch.manual_seed(0)
    G = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    initial = {k: v.detach().clone() for k, v in G.state_dict().items()}
    G_ema = make_ema(G, decay=0.9)
    with torch.no_grad():
        for p in G.parameters():
            p.add_(torch.randn_like(p))
    G(torch.randn(5, 4))  # moves the BatchNorm running statistics
    G_ema.update_parameters(G)
    current = G.state_dict()
    averaged = G_ema.module.state_dict()
    for name in ('0.weight', '0.bias', '1.running_mean'):
        expected = 0.9 * initial[name] + 0.1 * current[name]
        err = (averaged[name] - expected).abs().max().item()
        assert err < 1e-6, f'{name}: max error {err}'


def test_ema_rejects_bad_decay():
    with pytest.raises(ValueError, match='decay'):
        make_ema(nn.Linear(2, 2), decay=1.5)


def test_r1_matches_closed_form():
    # D(x) = Σ w ⊙ x has gradient w for every sample, so R1 = ‖w‖².
    torch.manual_seed(0)
    w = torch.randn(3, 4, 4, requires_grad=True)
    real_img = torch.randn(5, 3, 4, 4, requires_grad=True)
    penalty = r1_penalty((real_img * w).flatten(1).sum(1), real_img)
    expected = w.detach().pow(2).sum()
    assert torch.allclose(penalty, expected), f'{penalty.item()} vs {expected.item()}'
    assert penalty.requires_grad, 'R1 must keep its graph for the discriminator update'


def test_gradient_penalty_closed_form():
    # D(x) = c · Σ x has gradient norm c·sqrt(numel), so the penalty is (c·sqrt(d) − 1)².
    c, shape = 0.5, (2, 3, 2, 2)
    d = 3 * 2 * 2
    penalty = gradient_penalty(lambda x: c * x.flatten(1).sum(1), torch.randn(shape),
                               torch.randn(shape))
    expected = (c * d ** 0.5 - 1) ** 2
    assert abs(penalty.item() - expected) < 1e-5, f'{penalty.item()} vs {expected}'


@pytest.mark.parametrize('policy', ['color', 'translation', 'cutout', 'color,translation,cutout'])
def test_diff_augment_shape_and_gradient(policy):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    y = diff_augment(x, policy)
    assert y.shape == x.shape, f'shape {tuple(y.shape)}'
    y.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0, 'no gradient reached the input'


def test_cutout_zeroes_a_quarter_at_most():
    x = torch.ones(64, 3, 16, 16)
    zero_fraction = (diff_augment(x, 'cutout') == 0).float().mean(dim=(1, 2, 3))
    assert zero_fraction.max() <= 0.25 + 1e-6, f'max zeroed fraction {zero_fraction.max()}'
    assert zero_fraction.mean() > 0.1, f'mean zeroed fraction {zero_fraction.mean()}'


def test_translation_moves_content():
    torch.manual_seed(1)
    x = torch.arange(16.0).view(1, 1, 4, 4).repeat(32, 1, 1, 1)
    y = diff_augment(x, 'translation')
    assert (y != x).any(), 'no sample moved'
    assert set(y.unique().tolist()) <= set(range(16)), 'translation must copy or zero pixels'


def test_diff_augment_unknown_policy():
    with pytest.raises(ValueError, match='blur'):
        diff_augment(torch.zeros(1, 3, 4, 4), 'blur')


def test_epoch_sampler_resumes_mid_epoch():
    full = list(EpochSampler(10, seed=3, epoch=2))
    resumed = list(EpochSampler(10, seed=3, epoch=2, start=4))
    assert resumed == full[4:], f'{resumed} vs {full[4:]}'
    assert list(EpochSampler(10, seed=3, epoch=3)) != full, 'epochs should differ in order'


def test_infinite_loader_sets_epochs():
    sampler = EpochSampler(3, seed=0)
    loader = torch.utils.data.DataLoader(list(range(3)), batch_size=3, sampler=sampler)
    batches = infinite_loader(loader, start_epoch=5)
    first, second = next(batches), next(batches)
    assert sampler.epoch == 6, f'epoch {sampler.epoch}'
    assert sorted(first.tolist()) == sorted(second.tolist()) == [0, 1, 2]


def test_save_image_grid(tmp_path):
    path = tmp_path / 'grid.png'
    save_image_grid(torch.zeros(6, 3, 8, 8) - 1, path, nrow=3)
    with Image.open(path) as img:
        assert img.size == (3 * 10 + 2, 2 * 10 + 2), f'size {img.size}'
    assert [p.name for p in tmp_path.iterdir()] == ['grid.png'], 'temporary file left behind'
