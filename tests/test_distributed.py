"""Tests of models/distributed.py: torchrun set-up, DDP with the meta-layer, synchronised norms.

The multi-process tests start 2 processes with gloo on 127.0.0.1, once per module, and compare
what they saved with a single-process run in the test process.
"""
import json

import pytest
import torch
import torch.distributed as dist
from torch import nn

from models import distributed, orthogonality, zca
from models.amp import make_grad_scaler, step_with_orthogonal_update
from models.runs import UserError
from tests.two_ranks import WORLD_SIZE, run_two_ranks

GLOBAL_BATCH = 8
STEPS = 3
LR = 0.05
# float64 throughout: the 2-process and 1-process runs differ only in the summation order.
MATCH_TOL = 1e-9


def _tiny_model() -> nn.Sequential:
    """Pre-SVD conv -> ZCA meta-layer -> conv -> batch norm -> linear classifier, float64."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), zca.ZCANormBatch(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))
    return model.double()


def _global_batches() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(STEPS, GLOBAL_BATCH, 3, 6, 6, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 3, (STEPS, GLOBAL_BATCH), generator=generator)
    return images, labels


def _train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> None:
    """SGD with NOG and OLR on the stem convolution, one step per batch."""
    bare = distributed.unwrap_model(model)
    pre_svd = [bare[0].weight]
    groups = orthogonality.split_param_groups(bare.parameters(), pre_svd)
    optimizer = torch.optim.SGD(groups, lr=LR, momentum=0.9)
    update = orthogonality.OrthogonalUpdate(optimizer, pre_svd, nog=True, olr=True)
    scaler = make_grad_scaler('off', torch.device('cpu'))
    model.train()
    for x, y in zip(images, labels):
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        assert step_with_orthogonal_update(loss, optimizer, scaler, update, base_lr=LR)


def _worker(rank: int, out_dir: str) -> None:
    ctx = distributed.init_distributed('auto')
    images, labels = _global_batches()
    per_rank = distributed.per_rank_batch(GLOBAL_BATCH, ctx.world_size)
    shard = slice(rank * per_rank, (rank + 1) * per_rank)

    # Synchronised run: meta-layer moments and batch norm statistics summed over the ranks.
    model = distributed.convert_sync_batchnorm(_tiny_model(), ctx)
    n_synced = distributed.sync_covariance(model)
    _train(distributed.wrap_model(model, ctx), images[:, shard], labels[:, shard])
    torch.save(model.state_dict(), f'{out_dir}/sync_rank{rank}.pt')
    zca.recompute_norm_statistics(model, images[:, shard], ctx.device)
    torch.save(model.state_dict(), f'{out_dir}/recomputed_rank{rank}.pt')

    # Unsynchronised run: each rank whitens with its own half of the batch.
    model = _tiny_model()
    _train(distributed.wrap_model(model, ctx), images[:, shard], labels[:, shard])
    torch.save(model.state_dict(), f'{out_dir}/plain_rank{rank}.pt')

    torch.manual_seed(rank)
    layer = nn.Linear(3, 2)
    distributed.broadcast_module(layer)
    torch.manual_seed(0)
    rank0_layer = nn.Linear(3, 2)

    grads = [torch.full((3,), float(rank + 1), requires_grad=True), nn.Parameter(torch.ones(2))]
    grads[0].grad = torch.full((3,), float(rank + 1))
    distributed.average_gradients(grads)
    results = {
        'ctx': [ctx.rank, ctx.local_rank, ctx.world_size, str(ctx.device), ctx.backend],
        'n_synced': n_synced,
        'mean': distributed.all_reduce_mean({'loss': float(rank), 'acc': 2.0 * rank}, ctx),
        'any': distributed.any_rank(rank == 1, ctx),
        'none': distributed.any_rank(False, ctx),
        'averaged_grad': grads[0].grad.tolist(),
        'missing_grad': grads[1].grad.tolist(),
        'broadcast_equal': torch.equal(layer.weight, rank0_layer.weight),
    }
    distributed.barrier(ctx)
    with open(f'{out_dir}/results_rank{rank}.json', 'w') as f:
        json.dump(results, f)
    distributed.cleanup()


@pytest.fixture(scope='module')
def single_process_state():
    """The same training on the whole global batch in one process, without synchronisation."""
    model = _tiny_model()
    images, labels = _global_batches()
    _train(model, images, labels)
    return model.state_dict()


@pytest.fixture(scope='module')
def two_ranks(tmp_path_factory, single_process_state):
    """Run the 2-process job once; return its saved states and results per rank.

    It runs after ``single_process_state``, so the forked children inherit the modules that
    the first optimizer imports (torch._dynamo, seconds to load).
    """
    out_dir = tmp_path_factory.mktemp('ddp')
    exit_codes = run_two_ranks(_worker, str(out_dir))
    assert exit_codes == [0] * WORLD_SIZE, f"exit codes {exit_codes}"

    def load(name: str) -> dict:
        return torch.load(out_dir / name, weights_only=True)

    return {
        'sync': [load(f'sync_rank{r}.pt') for r in range(WORLD_SIZE)],
        'plain': [load(f'plain_rank{r}.pt') for r in range(WORLD_SIZE)],
        'recomputed': [load(f'recomputed_rank{r}.pt') for r in range(WORLD_SIZE)],
        'results': [json.loads((out_dir / f'results_rank{r}.json').read_text())
                    for r in range(WORLD_SIZE)],
    }


def _max_diff(a: dict, b: dict, keys) -> tuple[float, str]:
    diffs = {key: (a[key].double() - b[key].double()).abs().max().item() for key in keys}
    worst = max(diffs, key=diffs.get)
    return diffs[worst], worst


def _param_keys(state: dict) -> list[str]:
    buffers = ('running_', 'num_batches_tracked')
    return [key for key in state if not any(b in key for b in buffers)]


def test_ddp_params_identical_without_sync(two_ranks):
    rank0, rank1 = two_ranks['plain']
    diff, key = _max_diff(rank0, rank1, _param_keys(rank0))
    assert diff == 0.0, f"parameters differ between ranks: max |diff| {diff:.3g} in {key}"


def test_unsynced_running_stats_differ(two_ranks):
    rank0, rank1 = two_ranks['plain']
    diff, key = _max_diff(rank0, rank1, ['1.running_whitening'])
    assert diff > 1e-6, f"expected rank-local whitening statistics, max |diff| {diff:.3g}"


def test_sync_params_and_stats_identical(two_ranks):
    rank0, rank1 = two_ranks['sync']
    diff, key = _max_diff(rank0, rank1, list(rank0))
    assert diff == 0.0, f"state differs between ranks: max |diff| {diff:.3g} in {key}"


def test_sync_matches_single_process(two_ranks, single_process_state):
    synced = two_ranks['sync'][0]
    assert set(synced) == set(single_process_state)
    diff, key = _max_diff(synced, single_process_state, list(single_process_state))
    assert diff < MATCH_TOL, f"2 ranks vs 1 process: max |diff| {diff:.3g} in {key}"
    assert synced['4.num_batches_tracked'].item() == STEPS


def test_unsynced_differs_from_single_process(two_ranks, single_process_state):
    plain = two_ranks['plain'][0]
    diff, key = _max_diff(plain, single_process_state, _param_keys(plain))
    assert diff > 1e-6, f"rank-local statistics should change the parameters, max |diff| {diff:.3g}"


def test_sync_recompute_matches_single_process(two_ranks, single_process_state):
    model = _tiny_model()
    model.load_state_dict(single_process_state)
    images, _ = _global_batches()
    zca.recompute_norm_statistics(model, images, torch.device('cpu'))
    reference = model.state_dict()
    for rank, recomputed in enumerate(two_ranks['recomputed']):
        diff, key = _max_diff(recomputed, reference, list(reference))
        assert diff < MATCH_TOL, f"rank {rank} recomputed: max |diff| {diff:.3g} in {key}"


def test_worker_context_and_collectives(two_ranks):
    for rank, results in enumerate(two_ranks['results']):
        assert results['ctx'] == [rank, rank, WORLD_SIZE, 'cpu', 'gloo'], results['ctx']
        assert results['n_synced'] == 1, results['n_synced']
        assert results['mean'] == {'loss': 0.5, 'acc': 1.0}, results['mean']
        assert results['any'] is True
        assert results['none'] is False
        assert results['averaged_grad'] == [1.5] * 3, results['averaged_grad']
        assert results['missing_grad'] == [0.0] * 2, results['missing_grad']
        assert results['broadcast_equal'] is True


# ---------------------------------------------------------------------------------------------
# Single-process behaviour and flag checks
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def no_torchrun(monkeypatch):
    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE'):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fake_torchrun(monkeypatch):
    """torchrun's variables for local rank 1 of 2; no process group is ever started."""
    monkeypatch.setenv('RANK', '1')
    monkeypatch.setenv('WORLD_SIZE', '2')
    monkeypatch.setenv('LOCAL_RANK', '1')
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '2')
    monkeypatch.setenv('MASTER_ADDR', '127.0.0.1')
    monkeypatch.setenv('MASTER_PORT', '1')


def test_single_process_has_no_group(no_torchrun):
    ctx = distributed.init_distributed('cpu')
    assert not dist.is_initialized()
    assert ctx == distributed.DistContext(device=torch.device('cpu'))
    assert ctx.is_main and not ctx.is_distributed


def test_single_process_helpers_pass_through(no_torchrun):
    ctx = distributed.init_distributed('cpu')
    model = nn.Linear(2, 2)
    assert distributed.wrap_model(model, ctx) is model
    assert distributed.convert_sync_batchnorm(model, ctx) is model
    assert distributed.all_reduce_mean(torch.tensor(3.0), ctx) == 3.0
    assert distributed.all_reduce_mean({'a': 1}, ctx) == {'a': 1.0}
    assert distributed.unwrap_model(nn.DataParallel(model)) is model
    distributed.barrier(ctx)
    distributed.cleanup()


@pytest.mark.parametrize('flag', ['cuda:1', 'cuda:0', 'mps'])
def test_torchrun_rejects_conflicting_device(fake_torchrun, flag):
    with pytest.raises(UserError, match='--device'):
        distributed.init_distributed(flag)
    assert not dist.is_initialized()


@pytest.mark.skipif(torch.cuda.is_available(), reason='needs a machine without CUDA')
def test_torchrun_cuda_without_cuda_rejected(fake_torchrun):
    with pytest.raises(UserError, match='CUDA is not available'):
        distributed.init_distributed('cuda', flag_name='--gpu_ids')


def test_partial_torchrun_environment_rejected(no_torchrun, monkeypatch):
    monkeypatch.setenv('RANK', '0')
    with pytest.raises(UserError, match='WORLD_SIZE'):
        distributed.init_distributed('cpu')


@pytest.mark.parametrize('batch, world, expected', [(128, 1, 128), (128, 4, 32), (6, 3, 2)])
def test_per_rank_batch_divides(batch, world, expected):
    assert distributed.per_rank_batch(batch, world) == expected


@pytest.mark.parametrize('batch, world', [(10, 4), (0, 2), (3, 4)])
def test_per_rank_batch_rejects(batch, world):
    with pytest.raises(UserError, match=f'--batch {batch} .* multiple of the number of '
                                        f'processes \\({world}\\)'):
        distributed.per_rank_batch(batch, world, flag_name='--batch')


def test_gpu_ids_alone(no_torchrun):
    assert distributed.device_flag_from_gpu_ids('-1') == 'cpu'
    assert distributed.device_flag_from_gpu_ids('2') == 'cuda:2'
    with pytest.raises(UserError, match='torchrun --nproc_per_node 2'):
        distributed.device_flag_from_gpu_ids('0,1')
    with pytest.raises(UserError, match='invalid --gpu_ids'):
        distributed.device_flag_from_gpu_ids('a')


def test_gpu_ids_under_torchrun(fake_torchrun):
    assert distributed.device_flag_from_gpu_ids('-1') == 'cpu'
    assert distributed.device_flag_from_gpu_ids('0,1') == 'cuda'
    assert distributed.device_flag_from_gpu_ids('0') == 'auto'
    with pytest.raises(UserError, match='CUDA_VISIBLE_DEVICES'):
        distributed.device_flag_from_gpu_ids('1')


def test_rank_seed_distinct():
    seeds = {distributed.rank_seed(seed, rank) for seed in range(4) for rank in range(8)}
    assert len(seeds) == 32, f"only {len(seeds)} distinct seeds of 32"
    assert distributed.rank_seed(7, 0) == 7


def test_sync_covariance_alone_is_identity(no_torchrun):
    model = _tiny_model()
    reference = _tiny_model()
    assert distributed.sync_covariance(model) == 1
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    diff = (model(x) - reference(x)).abs().max().item()
    assert diff == 0.0, f"sync_covariance changed a single-process forward by {diff:.3g}"
