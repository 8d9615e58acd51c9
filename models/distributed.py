"""Multi-process training with torchrun: process group, devices, DDP and synchronised norms.

The trainers of this repository reproduce the decorrelated batch norm of Song, Sebe and Wang
(arXiv 2207.02119) and their GANs (arXiv 2212.05599). Each runs as one process, or as one process
per GPU under ``torchrun``, which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT:

    torchrun --nproc_per_node 4 main_cifar100.py --batch_size 128 ...

``--batch_size`` is the global batch: each of the N ranks takes ``batch_size / N``.

Gradients and NOG/OLR. ``DistributedDataParallel`` averages the gradients over the ranks during
``backward()`` (``average_gradients`` does the same without DDP), so after backward every rank
has the same averaged gradient ``L``. ``OrthogonalUpdate.apply`` then computes the same
polar factor ``U V^T`` and the same optimal learning rate on every rank. The optimizer applies
the same update, so the parameters stay identical without further communication (bit for bit
on identical hardware, as a 2-process CPU test checks).

Norm statistics. Without synchronisation each rank whitens with the covariance of its own
``batch_size / N`` samples, a noisier estimate than the single-process run's. ``sync_covariance``
makes every ZCANormBatch sum the raw moments ``m``, ``sum(x)`` and ``sum(x x^T)`` over the ranks
before centring,

    mu = sum_r sum_x_r / sum_r m_r,   Sigma = sum_r sum_xx_r / sum_r m_r - mu mu^T + eps I,

through an all-reduce that autograd differentiates, as ``nn.SyncBatchNorm`` does for the
variance. ``convert_sync_batchnorm`` does the same for every plain batch norm. With both, N
ranks on a split batch compute what one process computes on the whole batch (a test keeps
2 ranks to 1 process within 1e-9 in float64). Every rank must then run the same number of
training-mode forward passes, because each one is a collective.
"""
from __future__ import annotations

import os
import types
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from models.runs import UserError, select_device
from models.zca import meta_layers

TORCHRUN_VARIABLES = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK')


@dataclass(frozen=True)
class DistContext:
    """Placement of this process: its rank among ``world_size`` processes and its device.

    ``backend`` is None when no process group exists (a plain single-process run).
    """
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device('cpu')
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that logs, evaluates and writes checkpoints."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """True when a process group exists, even under torchrun with one process."""
        return self.backend is not None


def torchrun_environment() -> dict[str, int] | None:
    """Read RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE as torchrun sets them.

    Returns None when none of the first three is set. A partial or invalid set, or a missing
    MASTER_ADDR or MASTER_PORT, raises UserError.
    """
    present = [name for name in TORCHRUN_VARIABLES if name in os.environ]
    if not present:
        return None
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise UserError(f"{', '.join(present)} set but {', '.join(missing)} missing: launch "
                        f"with torchrun, or unset these variables to run one process")
    values = {}
    for name in (*TORCHRUN_VARIABLES, 'LOCAL_WORLD_SIZE'):
        raw = os.environ.get(name)
        if raw is None:
            continue
        try:
            values[name] = int(raw)
        except ValueError:
            raise UserError(f"environment variable {name}={raw!r} is not an integer") from None
    values.setdefault('LOCAL_WORLD_SIZE', values['WORLD_SIZE'])
    if not 0 <= values['RANK'] < values['WORLD_SIZE']:
        raise UserError(f"invalid RANK={values['RANK']}: expected 0 to WORLD_SIZE-1 = "
                        f"{values['WORLD_SIZE'] - 1}; launch with torchrun, which sets it")
    for name in ('MASTER_ADDR', 'MASTER_PORT'):
        if name not in os.environ:
            raise UserError(f"{name} is not set: launch with torchrun, which sets it")
    return values


def _torchrun_device(device_flag: str, local_rank: int, flag_name: str) -> torch.device:
    """Map a device flag to this rank's device: cuda:LOCAL_RANK, or the CPU."""
    if device_flag == 'cpu':
        return torch.device('cpu')
    if device_flag == 'auto' and not torch.cuda.is_available():
        return torch.device('cpu')
    if device_flag not in ('auto', 'cuda'):
        raise UserError(f"{flag_name} {device_flag} conflicts with torchrun, which gives each "
                        f"process cuda:LOCAL_RANK: pass {flag_name} cuda, auto or cpu and "
                        f"choose the GPUs with CUDA_VISIBLE_DEVICES")
    if not torch.cuda.is_available():
        raise UserError(f"{flag_name} {device_flag} was requested but CUDA is not available "
                        f"(torch {torch.__version__}); use {flag_name} cpu")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise UserError(f"LOCAL_RANK={local_rank} but only {count} GPU(s) are visible: "
                        f"lower torchrun's --nproc_per_node to {count}")
    return torch.device('cuda', local_rank)


def init_distributed(device_flag: str = 'auto', flag_name: str = '--device') -> DistContext:
    """Set up this process and return its DistContext.

    Without torchrun's variables the device is ``models.runs.select_device(device_flag)`` and
    no process group is created. Under torchrun the device is ``cuda:LOCAL_RANK`` with NCCL
    when CUDA is available (``device_flag`` 'auto' or 'cuda'), else the CPU with gloo.
    ``cpu`` is always allowed. Any other flag (``cuda:1``, ``cuda`` without CUDA) raises
    UserError naming ``flag_name``.
    """
    env = torchrun_environment()
    if env is None:
        return DistContext(device=select_device(device_flag))

    local_rank = env['LOCAL_RANK']
    device = _torchrun_device(device_flag, local_rank, flag_name)
    backend = 'nccl' if device.type == 'cuda' else 'gloo'
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method='env://', rank=env['RANK'],
                                world_size=env['WORLD_SIZE'])
    return DistContext(rank=env['RANK'], local_rank=local_rank,
                       world_size=env['WORLD_SIZE'], device=device, backend=backend)


def device_flag_from_gpu_ids(gpu_ids: str) -> str:
    """Translate a pix2pix-style ``--gpu_ids`` value into a ``--device`` value.

    '-1' is the CPU. Without torchrun one id ``k`` is ``cuda:k``, and a list raises UserError
    because one process drives one GPU. Under torchrun, where each rank uses cuda:LOCAL_RANK,
    only '-1', '0' (pix2pix's default, read as 'auto') and the full list
    ``0,...,LOCAL_WORLD_SIZE-1`` (read as 'cuda') are accepted.
    """
    ids = [part.strip() for part in gpu_ids.split(',') if part.strip()]
    if ids == ['-1']:
        return 'cpu'
    if not ids or not all(part.isdigit() for part in ids):
        raise UserError(f"invalid --gpu_ids {gpu_ids!r}: use -1 for the CPU or GPU ids "
                        f"such as 0 or 0,1")
    env = torchrun_environment()
    if env is None:
        if len(ids) > 1:
            raise UserError(f"--gpu_ids {gpu_ids} lists {len(ids)} GPUs but one process "
                            f"drives one GPU: launch torchrun --nproc_per_node {len(ids)}")
        return f'cuda:{ids[0]}'
    if ids == ['0']:
        return 'auto'
    if ids != [str(i) for i in range(env['LOCAL_WORLD_SIZE'])]:
        raise UserError(f"--gpu_ids {gpu_ids} conflicts with torchrun, which gives each "
                        f"process cuda:LOCAL_RANK: omit --gpu_ids and choose the GPUs with "
                        f"CUDA_VISIBLE_DEVICES")
    return 'cuda'


def per_rank_batch(global_batch: int, world_size: int, flag_name: str = '--batch_size') -> int:
    """Return ``global_batch / world_size``, or raise UserError naming ``flag_name``.

    The error covers a batch that ``world_size`` does not divide and a batch below 1.
    """
    if global_batch < 1 or global_batch % world_size != 0:
        raise UserError(f"{flag_name} {global_batch} is the global batch and must be a "
                        f"positive multiple of the number of processes ({world_size}): use "
                        f"a multiple of {world_size}")
    return global_batch // world_size


def rank_seed(seed: int, rank: int) -> int:
    """Return the seed of rank-local randomness (noise, augmentation). Rank 0 keeps ``seed``.

    Seed the model's initialisation with ``seed`` on every rank, and then the random
    generators with ``rank_seed(seed, rank)`` so that ranks draw different samples.
    """
    return (seed + 1_000_003 * rank) % 2**63


# ---------------------------------------------------------------------------------------------
# Models and gradients
# ---------------------------------------------------------------------------------------------

def wrap_model(model: nn.Module, ctx: DistContext, **ddp_options) -> nn.Module:
    """Wrap ``model`` in DistributedDataParallel when ``ctx.world_size > 1``, else return it.

    DDP keeps the same Parameter objects, so an optimizer or an OrthogonalUpdate built on the
    bare model still finds its parameters by identity. Evaluate through ``unwrap_model``: a
    DDP forward broadcasts buffers, a collective that a rank-0-only evaluation would hang on.
    """
    if ctx.world_size <= 1:
        return model
    device_ids = [ctx.device.index] if ctx.device.type == 'cuda' else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, **ddp_options)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the module inside a DDP or DataParallel wrapper, or the model if unwrapped."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy the parameters and buffers of rank ``src`` to every rank (a no-op alone).

    DDP does this when it wraps a model. Models trained with ``average_gradients`` instead
    need it once, after they are built or loaded from a checkpoint.
    """
    if not dist.is_initialized():
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=src)


def average_gradients(params: Iterable[nn.Parameter]) -> None:
    """Average the ``.grad`` of ``params`` over all ranks in place, in one all-reduce.

    It replaces DDP in trainers with several backward passes per step, such as GAN phases
    with a lazy R1 penalty. Call it after the last backward of a phase and before unscaling,
    NOG, OLR and ``optimizer.step()``. Every rank must pass the same parameters in the same
    order, and a missing gradient counts as zero.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for p, chunk in zip(params, flat.split([g.numel() for g in grads])):
        if p.grad is None:
            p.grad = chunk.view_as(p).clone()
        else:
            p.grad.copy_(chunk.view_as(p.grad))


def _mean_over_ranks(tensor: Tensor, ctx: DistContext) -> Tensor:
    if ctx.is_distributed:
        tensor = tensor.to(ctx.device)      # NCCL reduces only CUDA tensors
        dist.all_reduce(tensor)
        tensor /= ctx.world_size
    return tensor.cpu()


def all_reduce_mean(values: float | Tensor | dict[str, float | Tensor],
                    ctx: DistContext) -> float | dict[str, float]:
    """Average logged scalars over the ranks: a number, a one-element tensor, or a dict of them.

    Returns Python floats, and reduces a dict in one collective. Alone it only converts.
    Every rank must call it at the same point of the loop.
    """
    if isinstance(values, dict):
        keys = list(values)
        tensor = torch.tensor([float(values[key]) for key in keys], dtype=torch.float64)
        return dict(zip(keys, _mean_over_ranks(tensor, ctx).tolist()))
    return _mean_over_ranks(torch.tensor([float(values)], dtype=torch.float64), ctx).item()


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """Return True when ``flag`` is True on at least one rank (a collective under torchrun)."""
    if not ctx.is_distributed:
        return bool(flag)
    tensor = torch.tensor([int(flag)], device=ctx.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def barrier(ctx: DistContext) -> None:
    """Wait until every rank reaches this point (a no-op without a process group)."""
    if not ctx.is_distributed:
        return
    if ctx.backend == 'nccl':
        dist.barrier(device_ids=[ctx.device.index])
    else:
        dist.barrier()


def cleanup() -> None:
    """Destroy the process group, if any. Call once at the end of ``main``."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Synchronised norm statistics
# ---------------------------------------------------------------------------------------------

class _AllReduceSum(torch.autograd.Function):
    """All-reduce sum over the ranks whose backward all-reduces the incoming gradient.

    With ``y = sum_r x_r`` on every rank and the total loss ``sum_r loss_r``, the gradient of
    ``x_r`` is ``sum_r' d loss_r' / dy``, an all-reduce of the local ``d loss_r / dy``.
    (torch 2.14 deprecates ``torch.distributed.nn.functional.all_reduce``, which does this.)
    """

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> Tensor:
        grad = grad_output.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


def _all_reduce_moments(layer: nn.Module, count: int, sum_x: Tensor,
                        sum_xx: Tensor) -> tuple[int, Tensor, Tensor]:
    """Sum a ZCANormBatch's raw moments over the ranks, differentiably."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return count, sum_x, sum_xx
    moments = _AllReduceSum.apply(torch.cat([sum_x, sum_xx], dim=-1))   # (G, n, 1 + n)
    # ZCANormBatch expects an int count, so this costs one device sync per training forward.
    total = torch.tensor([count], dtype=torch.int64, device=sum_x.device)
    dist.all_reduce(total)
    return int(total.item()), moments[..., :1], moments[..., 1:]


def sync_covariance(model: nn.Module) -> int:
    """Make every ZCANormBatch in ``model`` sum its raw moments over all ranks before centring.

    Replaces the layers' ``_reduce_moments`` with an all-reduce of ``m``, ``sum(x)`` and
    ``sum(x x^T)`` whose backward all-reduces the gradient, so the loss of N ranks on a split
    batch has the gradient of one process on the whole batch. The moments are taken about the
    running mean, which stays identical on all ranks because every rank applies the same
    global update (and DDP broadcasts rank 0's buffers). Evaluation mode needs no collective.
    ``recompute_norm_statistics`` then sums over the ranks too, so every rank must pass it the
    same number of batches (a ``DistributedSampler`` split does).

    Returns the number of layers changed. Without a process group they behave as before.
    """
    layers = meta_layers(model)
    for layer in layers:
        layer._reduce_moments = types.MethodType(_all_reduce_moments, layer)
    return len(layers)


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics are summed over the ranks, for CPU runs (gloo).

    ``nn.SyncBatchNorm`` accepts only GPU tensors, and DDP rejects it in a CPU module, so CPU
    runs under torchrun use this layer. In training mode with more than one rank it
    all-reduces ``m``, ``sum(x)`` and ``sum(x^2)`` per channel (differentiably) and normalises
    with the global batch moments,

        mu = sum(x) / m,   var = sum(x^2) / m - mu^2,   y = gamma (x - mu) / sqrt(var + eps) + beta,

    updating the running variance with the unbiased ``var * m / (m - 1)``. Otherwise it is a
    plain batch norm. NOTE: the one-pass variance loses precision when ``mu^2 >> var``; CUDA
    runs use torch's SyncBatchNorm instead.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input with at least 2 dims, got {input.dim()}")

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        self._check_input_dim(input)
        C = input.shape[1]
        dtype = torch.promote_types(input.dtype, torch.float32)
        x = input.to(dtype).transpose(0, 1).reshape(C, -1)                 # (C, N*H*W)
        moments = _AllReduceSum.apply(torch.stack([x.sum(1), (x * x).sum(1)]))  # (2, C)
        count = torch.tensor([x.shape[1]], dtype=torch.int64, device=x.device)
        dist.all_reduce(count)
        m = int(count.item())
        mean = moments[0] / m
        var = moments[1] / m - mean * mean
        self._update_running_stats(mean.detach(), var.detach(), m)

        shape = (1, C) + (1,) * (input.dim() - 2)
        y = (input.to(dtype) - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(input.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, m: int) -> None:
        if not self.track_running_stats:
            return
        self.num_batches_tracked.add_(1)
        factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                  else self.momentum)
        unbiased = var * m / max(m - 1, 1)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)


def _to_cpu_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm*d under ``module`` by a CPUSyncBatchNorm sharing its tensors."""
    if (isinstance(module, nn.modules.batchnorm._BatchNorm)
            and not isinstance(module, CPUSyncBatchNorm)):
        converted = CPUSyncBatchNorm(module.num_features, module.eps, module.momentum,
                                     module.affine, module.track_running_stats)
        # The same Parameter and buffer objects, as nn.SyncBatchNorm.convert_sync_batchnorm.
        for name, tensor in [*module.named_parameters(recurse=False),
                             *module.named_buffers(recurse=False)]:
            setattr(converted, name, tensor)
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        module.add_module(name, _to_cpu_sync_batchnorm(child))
    return module


def convert_sync_batchnorm(model: nn.Module, ctx: DistContext) -> nn.Module:
    """Replace every BatchNorm*d by a synchronised one when ``ctx.world_size > 1``.

    On CUDA this is ``nn.SyncBatchNorm.convert_sync_batchnorm``; on the CPU the layers become
    ``CPUSyncBatchNorm``. Returns the model, which is a new object only when ``model`` itself
    is a batch norm. Call it before ``wrap_model`` and before building the optimizer.
    ZCANormBatch layers need ``sync_covariance`` instead.
    """
    if ctx.world_size <= 1:
        return model
    if ctx.device.type == 'cpu':
        return _to_cpu_sync_batchnorm(model)
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)
