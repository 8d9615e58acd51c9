"""Exact comparison of nested training states (state dicts, optimizer states, random states)."""
import torch


def assert_states_equal(first, second, where=''):
    """Assert that two nested dicts, lists and tensors are equal, every tensor bit for bit.

    The message names the path of the first difference and, for tensors, the largest absolute
    difference.
    """
    if isinstance(first, torch.Tensor):
        assert torch.equal(first, second), f"{where}: max difference {(first - second).abs().max()}"
    elif isinstance(first, dict):
        assert first.keys() == second.keys(), f"{where}: keys {first.keys() ^ second.keys()}"
        for key in first:
            assert_states_equal(first[key], second[key], f'{where}/{key}')
    elif isinstance(first, (list, tuple)):
        assert len(first) == len(second), f"{where}: lengths {len(first)} and {len(second)}"
        for index, (x, y) in enumerate(zip(first, second)):
            assert_states_equal(x, y, f'{where}/{index}')
    else:
        assert first == second, f"{where}: {first!r} != {second!r}"
