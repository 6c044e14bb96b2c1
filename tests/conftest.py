import gzip, hashlib, pickle, socket, struct
from pathlib import Path
import numpy as np, pytest, torch


@pytest.fixture(autouse=True)
def data_env(tmp_path, monkeypatch):
    "Every test gets its own empty data folder: nothing leaks from ~/.cache or from another test"
    d = tmp_path/'secondorder_data'
    monkeypatch.setenv('SECONDORDER_DATA', str(d))
    return d



@pytest.fixture
def one_thread(monkeypatch):
    "One thread here and in the processes started: on a shared machine, two threads of small ops wait on each other"
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def snapshot(d:Path) -> dict|None:
    "Every path under `d` with its mtime and bytes: equal snapshots mean nothing changed"
    if not d.exists(): return None
    return {str(p.relative_to(d)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None) for p in sorted(d.rglob('*'))}

def write_idx(path:Path, a:np.ndarray, gz:bool=False):
    "Write `a` (uint8) in the IDX format of MNIST: zero, zero, type 0x08, ndim, big-endian sizes, then the bytes"
    head = struct.pack('>BBBB', 0, 0, 0x08, a.ndim) + struct.pack(f'>{a.ndim}I', *a.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    with (gzip.open if gz else open)(path, 'wb') as f: f.write(head + a.astype(np.uint8).tobytes())


def fake_mnist(folder:Path, n_train=50, n_test=20, gz=False, seed=0):
    "The four MNIST IDX files with random images in `folder`; returns {split: (images, labels)}"
    rng, out = np.random.default_rng(seed), {}
    for split, n in (('train', n_train), ('t10k', n_test)):
        x, y = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)
        sfx = '.gz' if gz else ''
        write_idx(folder/f'{split}-images-idx3-ubyte{sfx}', x, gz)
        write_idx(folder/f'{split}-labels-idx1-ubyte{sfx}', y, gz)
        out[split] = x, y
    return out


def md5(p:Path) -> str: return hashlib.md5(p.read_bytes()).hexdigest()


def fake_cifar(folder:Path, n_per_batch=8, seed=0):
    "CIFAR-10's python batches (protocol-2 pickles as the originals: uint8 rows of R, G, B planes) in `folder`; returns (train, test) as (N, 32, 32, 3), labels"
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    files, out = {}, {'train': [], 'test': []}
    for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n_per_batch).tolist()
        with open(folder/name, 'wb') as f:
            pickle.dump({'batch_label': name, 'labels': labels, 'data': data,
                         'filenames': [f'{i}.png' for i in range(n_per_batch)]}, f, protocol=2)
        files[name] = md5(folder/name)
        out['test' if name == 'test_batch' else 'train'].append((data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels))
    with open(folder/'batches.meta', 'wb') as f:
        pickle.dump({'label_names': 'airplane automobile bird cat deer dog frog horse ship truck'.split(),
                     'num_cases_per_batch': n_per_batch, 'num_vis': 3072}, f, protocol=2)
    files['batches.meta'] = md5(folder/'batches.meta')
    cat = lambda parts: (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    return files, cat(out['train']), cat(out['test'])


@pytest.fixture
def cifar_checksums(monkeypatch):
    "Make torchvision's CIFAR10 expect the md5 sums of the files a test wrote"
    from torchvision.datasets import CIFAR10
    def patch(files):
        monkeypatch.setattr(CIFAR10, 'train_list', [[f'data_batch_{i}', files[f'data_batch_{i}']] for i in range(1, 6)])
        monkeypatch.setattr(CIFAR10, 'test_list', [['test_batch', files['test_batch']]])
        monkeypatch.setattr(CIFAR10, 'meta', {**CIFAR10.meta, 'md5': files['batches.meta']})
    return patch


@pytest.fixture
def ray():
    "The `ray` module, no cluster joined before or after the test"
    ray = pytest.importorskip('ray')
    assert not ray.is_initialized()
    yield ray
    assert not ray.is_initialized()  # whoever started a cluster stopped it


def free_port() -> int:
    "A TCP port nothing listens on now"
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]
