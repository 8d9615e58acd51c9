"""Exact comparison of nested training states (state dicts, optimizer states, random states)."""
import torch


def assert_states_equal(one, two, where=''):
    """Assert that two nested dicts, lists and tensors are equal, every tensor bit for bit.

    The message names the path of the first difference and, for tensors, the largest absolute
    difference.
    """
    if isinstance(one, torch.Tensor):
        assert torch.equal(one, two), f"{where}: max difference {(one - two).abs().max()}"
    elif isinstance(one, dict):
        assert one.keys() == two.keys(), f"{where}: keys {one.keys() ^ two.keys()}"
        for key in one:
            assert_states_equal(one[key], two[key], f'{where}/{key}')
    elif isinstance(one, (list, tuple)):
        assert len(one) == len(two), f"{where}: lengths {len(one)} and {len(two)}"
        for index, (x, y) in enumerate(zip(one, two)):
            assert_states_equal(x, y, f'{where}/{index}')
    else:
        assert one == two, f"{where}: {one!r} != {two!r}"
