"""A tiny CIFAR-100 folder in the pickle format of the official archive, for trainer tests."""
import pickle

import numpy as np


def write_cifar100_folder(root, train_count, test_count):
    """Write root/cifar-100-python/{train,test,meta} with random images and labels."""
    folder = root / 'cifar-100-python'
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, count in (('train', train_count), ('test', test_count)):
        batch = {b'data': rng.integers(0, 256, (count, 3072), dtype=np.uint8),
                 b'fine_labels': rng.integers(0, 100, count).tolist(),
                 b'coarse_labels': rng.integers(0, 20, count).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {b'fine_label_names': [f'class{i}'.encode() for i in range(100)],
            b'coarse_label_names': [f'super{i}'.encode() for i in range(20)]}
    (folder / 'meta').write_bytes(pickle.dumps(meta, protocol=2))
    return root
