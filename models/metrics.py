"""FID and LPIPS for the GAN evaluations, with offline loading of their pretrained weights.

FID (Heusel et al., arXiv 1706.08500) uses pytorch-fid's InceptionV3 with the TensorFlow-ported
weights ``pt_inception-2015-12-05-6726825d.pth``. LPIPS (Zhang et al., arXiv 1801.03924) uses the
lpips package with a VGG16 backbone, whose torchvision weights are ``vgg16-397923af.pth`` (the
small linear heads ship inside the lpips package). Neither loader downloads anything: each looks
at an explicit path, then in torch's hub cache, and raises ``UserError`` naming both places when
the file is in neither.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable
from unittest import mock

import numpy as np
import torch
from torch import Tensor, nn

from models.runs import UserError

INCEPTION_FILE = 'pt_inception-2015-12-05-6726825d.pth'
INCEPTION_URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
                 f'{INCEPTION_FILE}')
VGG16_FILE = 'vgg16-397923af.pth'
VGG16_URL = f'https://download.pytorch.org/models/{VGG16_FILE}'


class MissingWeightsError(UserError):
    """A pretrained weights file that is neither at the given path nor in the hub cache."""


def hub_checkpoint_dir() -> Path:
    """Return torch's cache folder of downloaded weights, ``torch.hub.get_dir()/checkpoints``."""
    return Path(torch.hub.get_dir()) / 'checkpoints'


def find_weights(weights_path, file_name: str, url: str, flag: str, purpose: str) -> Path:
    """Return the weights file at ``weights_path``, or else in the hub cache, or raise UserError."""
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if path.is_file():
            return path
        raise MissingWeightsError(f'{flag} {path}: file not found. It should be {file_name}, '
                                  f'downloaded from {url}')
    cached = hub_checkpoint_dir() / file_name
    if cached.is_file():
        return cached
    raise MissingWeightsError(
        f"{purpose} needs the weights file {file_name}, which is not in torch's hub cache "
        f'{cached.parent}. On a machine with internet access download {url}, then copy it to '
        f'{cached} or pass its path with {flag}')


def _wrong_weights(path: Path, file_name: str, url: str, error: Exception) -> UserError:
    return UserError(f'{path} is not a readable copy of {file_name} ({type(error).__name__}: '
                     f'{error}); download it again from {url}')


def read_weights(path: Path, file_name: str, url: str) -> dict:
    """Load a weights file with ``weights_only=True``, raising ``UserError`` when it is damaged."""
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:
        raise _wrong_weights(path, file_name, url, err) from err


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Return the Fréchet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``.

    ``d² = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^{1/2})``, computed by pytorch-fid (which adds a
    small multiple of the identity when the product is singular). This is the FID when the
    Gaussians are fitted to Inception pool features.
    """
    from pytorch_fid.fid_score import calculate_frechet_distance

    return float(calculate_frechet_distance(np.atleast_1d(mu1), np.atleast_2d(sigma1),
                                            np.atleast_1d(mu2), np.atleast_2d(sigma2)))


def load_inception(weights_path=None, device='cpu') -> nn.Module:
    """Build pytorch-fid's InceptionV3 (2048-d pool features) with the standard FID weights.

    The weights come from ``weights_path`` or the hub cache (see ``find_weights``). The model
    takes images in ``[0, 1]``, resizes them to 299 × 299 and returns ``[features]`` with
    features of shape ``(N, 2048, 1, 1)``.
    """
    from pytorch_fid import inception

    path = find_weights(weights_path, INCEPTION_FILE, INCEPTION_URL, '--inception_weights',
                        'FID')

    def load_local(url, *args, **kwargs):
        return read_weights(path, INCEPTION_FILE, INCEPTION_URL)

    # pytorch-fid fetches its weights by URL inside the constructor, so the fetch is redirected
    # to the local file to keep offline machines from attempting a download.
    with mock.patch.object(inception, 'load_state_dict_from_url', load_local):
        try:
            model = inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
        except RuntimeError as err:  # a readable file with other tensors
            raise _wrong_weights(path, INCEPTION_FILE, INCEPTION_URL, err) from err
    return model.eval().to(device)


@torch.no_grad()
def inception_statistics(images: Iterable[Tensor], model: nn.Module,
                         device) -> tuple[np.ndarray, np.ndarray]:
    """Return the mean ``(2048,)`` and covariance ``(2048, 2048)`` of Inception pool features.

    ``images`` yields batches ``(N, 3, H, W)`` in ``[-1, 1]`` (generated or real); the
    statistics are in float64, with the covariance divisor ``n − 1`` as in pytorch-fid.
    """
    features = []
    for batch in images:
        x = (batch.to(device).float() + 1) / 2  # pytorch-fid expects [0, 1]
        features.append(model(x.clamp(0, 1))[0].flatten(1).double().cpu())
    feats = torch.cat(features).numpy()
    if feats.shape[0] < 2:
        raise UserError(f'FID needs at least 2 images, got {feats.shape[0]}')
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def load_lpips(weights_path=None, device='cpu') -> nn.Module:
    """Build LPIPS with a VGG16 backbone (Zhang et al., arXiv 1801.03924) without downloading.

    ``d(x, y) = Σ_l mean_hw ‖w_l ⊙ (f̂_l(x) − f̂_l(y))‖²`` over five VGG16 stages, where ``f̂``
    are channel-normalised features. The linear weights ``w_l`` come from the lpips package;
    the VGG16 backbone from ``weights_path`` or the hub cache (torchvision's ImageNet weights).
    Inputs are images in ``[-1, 1]``; the output has shape ``(N, 1, 1, 1)``.
    """
    import lpips
    from torchvision.models import vgg16

    path = find_weights(weights_path, VGG16_FILE, VGG16_URL, '--lpips_weights', 'LPIPS (PPL)')
    state = read_weights(path, VGG16_FILE, VGG16_URL)
    backbone = vgg16(weights=None)
    try:
        backbone.load_state_dict(state)
    except RuntimeError as err:  # a readable file with other tensors
        raise _wrong_weights(path, VGG16_FILE, VGG16_URL, err) from err
    model = lpips.LPIPS(net='vgg', pnet_rand=True, verbose=False)
    # lpips splits vgg16().features into slices whose children keep their original indices.
    for stage in (model.net.slice1, model.net.slice2, model.net.slice3, model.net.slice4,
                  model.net.slice5):
        for index, layer in stage.named_children():
            layer.load_state_dict(backbone.features[int(index)].state_dict())
    return model.eval().requires_grad_(False).to(device)
