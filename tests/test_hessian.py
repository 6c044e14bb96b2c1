import math, warnings
import pytest, torch, torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian as func_hessian
from secondorder_cnn.hessian import PROBES, HessianOperator, hutchinson_diag, probe
from secondorder_cnn.model import LeNet5, to_device


def mlp(seed=0, act=nn.Tanh):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 32), act(), nn.Linear(32, 16), act(), nn.Linear(16, 5)).double()


def bn_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.5),
                         nn.Flatten(), nn.Linear(3*7*7, 10)).double()


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(101, 20, generator=g, dtype=torch.float64), torch.randint(0, 5, (101,), generator=g)


def func_dense(model, x, y):
    "The Hessian by torch.func.hessian of the loss as a function of all parameters, flattened"
    names, ps = zip(*model.named_parameters())
    shapes, sizes = [p.shape for p in ps], [p.numel() for p in ps]
    flat = torch.cat([p.detach().reshape(-1) for p in ps])
    loss = lambda t: F.cross_entropy(functional_call(model, {n: v.view(s) for n, v, s in zip(names, t.split(sizes), shapes)}, (x,)), y)
    return func_hessian(loss)(flat)


def cat(vs): return torch.cat([v.reshape(-1) for v in vs])


def test_dense_is_torch_func_hessian(data):
    net = mlp()
    H = HessianOperator(net, F.cross_entropy, data=data)
    assert H.n == 20*32 + 32 + 32*16 + 16 + 16*5 + 5 == 1285
    torch.testing.assert_close(H.dense(), func_dense(net, *data), rtol=0, atol=1e-12)


def test_ragged_dataloader_is_the_whole_set(data):
    x, y = data
    net = mlp()
    whole = HessianOperator(net, F.cross_entropy, data=data).dense()
    batches = [(x[i:i+32], y[i:i+32]) for i in range(0, 101, 32)]  # 32, 32, 32, 5
    H = HessianOperator(net, F.cross_entropy, dataloader=batches)
    torch.testing.assert_close(H.dense(), whole, rtol=0, atol=1e-12)
    v = [torch.randn_like(p) for p in net.parameters()]
    torch.testing.assert_close(cat(H.hvp(v)), whole @ cat(v), rtol=0, atol=1e-12)


def test_spectrum_against_the_truth(data):
    net = mlp(seed=3)
    H = HessianOperator(net, F.cross_entropy, data=data)
    lam, U = torch.linalg.eigh(func_dense(net, *data))
    eigs, vecs = r = H.eigenvalues(top_n=5)
    torch.testing.assert_close(torch.tensor(eigs, dtype=torch.float64), lam.flip(0)[:5], rtol=1e-4, atol=0)
    assert all(abs(cat(v) @ U[:, -1 - i]) >= 0.999 for i, v in enumerate(vecs))
    assert r.converged and r.n_hvp <= 60
    for e, v, res in zip(eigs, vecs, r.residuals):  # the reported residuals are the true ones
        true = (cat(H.hvp(v)) - e * cat(v)).norm().item()
        assert abs(true - res) <= 1e-6 * abs(e)
    (low,), (lv,) = H.eigenvalues(which='smallest', max_iter=300)
    assert abs(low - lam[0].item()) <= 1e-4 * abs(lam[0].item()) and abs(cat(lv) @ U[:, 0]) >= 0.999
    t, se = H.trace(max_hvp=300)
    assert abs(t - lam.sum().item()) <= 2 * se
    grid, phi = rd = H.density(n_iter=60, n_runs=30)
    assert abs(torch.trapezoid(phi, grid).item() - 1) < 1e-6
    P = len(lam)
    for k, truth in ((1, lam.sum().item() / P), (2, (lam**2).sum().item() / P)):
        m = torch.tensor([(w * th**k).sum().item() for th, w in zip(rd.nodes, rd.weights)])
        assert abs(m.mean().item() - truth) <= 3 * m.std().item() / math.sqrt(len(m))


def test_seeded_results_reproduce(data):
    H = HessianOperator(mlp(), F.cross_entropy, data=data)
    assert H.trace(max_hvp=60, seed=5) == H.trace(max_hvp=60, seed=5)
    assert H.trace(max_hvp=60, seed=5) != H.trace(max_hvp=60, seed=6)
    assert H.eigenvalues(top_n=2, seed=1)[0] == H.eigenvalues(top_n=2, seed=1)[0]
    a, b = H.density(n_iter=10, n_runs=2, seed=3), H.density(n_iter=10, n_runs=2, seed=3)
    assert torch.equal(a[1], b[1])


def test_mode_restored_and_running_stats_untouched():
    net = bn_cnn()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 1, 16, 16, generator=g, dtype=torch.float64), torch.randint(0, 10, (20,), generator=g)
    net.train()
    net(x)  # running statistics that eval mode must use and keep
    net[4].eval()  # a module in its own mode
    stats = net[1].running_mean.clone()
    H = HessianOperator(net, F.cross_entropy, dataloader=[(x[:12], y[:12]), (x[12:], y[12:])])
    H.eigenvalues(top_n=1)
    assert net.training and net[1].training and not net[4].training
    assert torch.equal(net[1].running_mean, stats)
    net.eval()
    torch.testing.assert_close(H.dense(), func_dense(net, x, y), rtol=0, atol=1e-10)


def test_channels_last_lenet_matches_contiguous():
    torch.manual_seed(0)
    m = LeNet5().double()
    x, y = torch.rand(30, 1, 32, 32, dtype=torch.float64), torch.randint(0, 10, (30,))
    v = [torch.randn_like(p) for p in m.parameters()]
    hv = HessianOperator(m, F.cross_entropy, data=(x, y)).hvp(v)
    hc = HessianOperator(to_device(m, 'cpu'), F.cross_entropy, data=(x, y)).hvp(v)
    torch.testing.assert_close(cat(hc), cat(hv), rtol=1e-9, atol=1e-12)


def test_progress_bars_print(data, capsys):
    H = HessianOperator(mlp(), F.cross_entropy, data=data, progress=True)
    H.eigenvalues(top_n=1)
    assert 'Lanczos' in capsys.readouterr().out


def test_unconverged_lanczos_warns(data):
    H = HessianOperator(mlp(), F.cross_entropy, data=data)
    with pytest.warns(UserWarning, match='Lanczos stopped at max_iter=3'):
        r = H.eigenvalues(top_n=2, max_iter=3)
    assert r.converged is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')
def test_cuda_matches_cpu(data):
    net = mlp()
    v = [torch.randn_like(p) for p in net.parameters()]
    cpu = HessianOperator(net, F.cross_entropy, data=data).hvp(v)
    gpu = HessianOperator(mlp().cuda(), F.cross_entropy, data=(data[0].cuda(), data[1].cuda())).hvp([t.cuda() for t in v])
    torch.testing.assert_close(cat(gpu).cpu(), cat(cpu), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize('call, msg', [
    (lambda H: H.eigenvalues(top_n=0), 'top_n=0 must be between 1 and the number of parameters, 1,285'),
    (lambda H: H.eigenvalues(top_n=1286), 'top_n=1286 must be between 1'),
    (lambda H: H.eigenvalues(which='biggest'), "which='biggest'; allowed: 'largest', 'smallest'"),
    (lambda H: H.eigenvalues(method='arnoldi'), "method='arnoldi'; allowed: 'lanczos', 'power'"),
    (lambda H: H.hvp([torch.zeros(3)]), 'expected 6 tensors shaped [(32, 20), (32,), (16, 32), (16,), (5, 16), (5,)]'),
    (lambda H: H.trace(method='exact'), "method='exact'; allowed: 'hutch++', 'hutchinson'"),
    (lambda H: H.trace(max_hvp=2), 'n_lowrank=0 must be at least 1'),
    (lambda H: H.density(n_iter=0), 'n_iter=0 and n_runs=5 must be at least 1'),
    (lambda H: H.dense(max_params=1000), 'a dense Hessian of 1,285 parameters is too large; allowed up to max_params=1,000'),
])
def test_bad_calls(data, call, msg):
    H = HessianOperator(mlp(), F.cross_entropy, data=data)
    with pytest.raises(ValueError) as e: call(H)
    assert msg in str(e.value)


def test_bad_construction(data):
    x, y = data
    with pytest.raises(ValueError, match=r"criterion must return a scalar loss, got shape \(101,\)"):
        HessianOperator(mlp(), nn.CrossEntropyLoss(reduction='none'), data=data)
    with pytest.raises(ValueError, match='data is empty'): HessianOperator(mlp(), F.cross_entropy, data=(x[:0], y[:0]))
    with pytest.raises(ValueError, match='the dataloader is empty'): HessianOperator(mlp(), F.cross_entropy, dataloader=[])
    with pytest.raises(ValueError, match='give exactly one of'): HessianOperator(mlp(), F.cross_entropy, data=data, dataloader=[data])
    with pytest.raises(ValueError, match='give exactly one of'): HessianOperator(mlp(), F.cross_entropy)
    with pytest.raises(ValueError, match='no parameter that requires grad'): HessianOperator(mlp().requires_grad_(False), F.cross_entropy, data=data)


# ---------- Hutchinson ----------

def test_hutchinson_averages_its_probes():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    ps = list(net.parameters())
    gs = torch.autograd.grad(F.cross_entropy(net(torch.randn(8, 3, dtype=torch.float64)), torch.randint(0, 2, (8,))), ps, create_graph=True)
    for dist in PROBES:
        one = [hutchinson_diag(gs, ps, 1, dist, torch.Generator().manual_seed(1), retain_graph=True)]
        g = torch.Generator().manual_seed(1)
        singles = [hutchinson_diag(gs, ps, 1, dist, g, retain_graph=True) for _ in range(4)]
        four = hutchinson_diag(gs, ps, 4, dist, torch.Generator().manual_seed(1), retain_graph=True)
        assert all(torch.equal(a, b) for a, b in zip(one[0], singles[0]))
        assert all(torch.allclose(f, sum(s[i] for s in singles) / 4, atol=1e-15) for i, f in enumerate(four))


def test_probe_is_the_same_in_any_memory_format():
    p = torch.zeros(6, 3, 5, 5).to(memory_format=torch.channels_last)
    z = probe(p, gen=torch.Generator().manual_seed(0))
    assert torch.equal(z, probe(p.contiguous(), gen=torch.Generator().manual_seed(0)))


GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')

@pytest.mark.parametrize('dev', ['cpu', pytest.param('cuda', marks=GPU)])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_probes_are_the_ones_drawn_before(data, dev, dtype):
    "The operator's signs (CPU integers, then converted and moved) and the optimizers' probes, to the bit"
    net = mlp().to(dev, dtype)
    H = HessianOperator(net, F.cross_entropy, data=(data[0].to(dev, dtype), data[1].to(dev)))
    old, new = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for k in (7, None, None):
        z = H._signs(new, k)
        ref = 2 * torch.randint(0, 2, (H.n,) if k is None else (k, H.n), generator=old).to(H.params[0]) - 1
        assert z.dtype == ref.dtype and z.device == ref.device and torch.equal(z, ref)
    p = torch.zeros(6, 3, 5, 5, dtype=dtype, device=dev).to(memory_format=torch.channels_last)
    old, new = torch.Generator(dev).manual_seed(3), torch.Generator(dev).manual_seed(3)
    for dist in PROBES * 2:
        z = probe(p, dist, new)
        ref = (torch.randn(p.shape, generator=old, dtype=p.dtype, device=p.device) if dist == 'gaussian' else
               torch.randint(0, 2, p.shape, generator=old, dtype=p.dtype, device=p.device).mul_(2).sub_(1))
        assert z.dtype == ref.dtype and z.device == ref.device and torch.equal(z, ref)
