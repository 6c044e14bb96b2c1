"SOAP against the authors' soap.py (not on PyPI: `$SOAP_SRC`), pytorch_optimizer's in float32, its convex floor"
import copy, os, types
from unittest import mock
import numpy as np
import pytest, torch, torch.nn.functional as F
from torch import nn
import pytorch_optimizer
import pytorch_optimizer.optimizer.soap as port_soap
from secondorder_cnn.data import get_dls
from secondorder_cnn.model import LeNet5, to_device
from secondorder_cnn.optimizers import SOAP, make_optimizer, merged_shape, train_step
from twins import digit_batches, lenet64, max_diff, run


@pytest.fixture(scope='module')
def batches(): return digit_batches()


# ---------- the authors' soap.py (github.com/nikhilvyas/SOAP, commit a1e5535) ----------

@pytest.fixture(scope='module')
def authors():
    "The authors' soap.py, from the path in $SOAP_SRC (the file, or a checkout that holds it); never committed here"
    path = os.environ.get('SOAP_SRC')
    if not path: pytest.skip("SOAP_SRC is unset: it names a copy of the authors' soap.py (github.com/nikhilvyas/SOAP)")
    if os.path.isdir(path): path = os.path.join(path, 'soap.py')
    if not os.path.exists(path): pytest.skip(f"SOAP_SRC names no file: {path}")
    mod = types.ModuleType('authors_soap')
    exec(compile(open(path).read(), path, 'exec'), mod.__dict__)
    return mod


def no_round_trip(authors):
    "Their SOAP with its momentum left alone on the steps that keep the basis: their code turns M' back and forth "
    "through Q at every step, a rounding of the identity that ours skips; on refreshes their rotation is kept"
    class SOAPNoRoundTrip(authors.SOAP):
        def update_preconditioner(self, grad, state, **kw):
            m, Q = state['exp_avg'], state['Q']
            super().update_preconditioner(grad, state, **kw)
            if state['Q'] is Q: state['exp_avg'] = m
    return SOAPNoRoundTrip


def authors_run(model, opt, batches, f64=True):
    "Their step runs the closure under no_grad, so the gradients come first. In float64 their float32 casts are made "
    "identities and torch's default dtype is float64, in which they build their factors"
    ps = list(model.parameters())
    for xb, yb in batches:
        for p, g in zip(ps, torch.autograd.grad(F.cross_entropy(model(xb), yb), ps)): p.grad = g
        if not f64: opt.step(); continue
        default = torch.get_default_dtype()
        with mock.patch.object(torch.Tensor, 'float', lambda self: self):
            torch.set_default_dtype(torch.float64)
            try: opt.step()
            finally: torch.set_default_dtype(default)


@pytest.mark.parametrize('kw', [
    dict(),
    dict(precondition_frequency=3),
    dict(precondition_frequency=3, merge_dims=True, max_precond_dim=100, precondition_1d=True),
    dict(precondition_frequency=2, normalize_grads=True, weight_decay=0.1, lr=0.01, betas=(0.9, 0.99),
         shampoo_beta=0.9)])
def test_equals_the_authors(batches, authors, kw):
    ours, peer = lenet64(), lenet64()
    run(ours, SOAP(ours.parameters(), **kw), batches)
    authors_run(peer, no_round_trip(authors)(peer.parameters(), **kw), batches)
    assert max_diff(ours, lenet64()) > 0.05
    assert max_diff(ours, peer) == 0


def test_equals_the_authors_in_float32(batches, authors):
    "As they run it: float32 weights, nothing changed but the round trip"
    torch.manual_seed(0)
    ours = LeNet5()
    peer, start = copy.deepcopy(ours), copy.deepcopy(ours)
    b32 = [(xb.float(), yb) for xb, yb in batches]
    run(ours, SOAP(ours.parameters(), precondition_frequency=3), b32)
    authors_run(peer, no_round_trip(authors)(peer.parameters(), precondition_frequency=3), b32, f64=False)
    assert max_diff(ours, start) > 0.05
    assert max_diff(ours, peer) == 0


def test_equals_the_unmodified_authors_until_the_first_refresh(batches, authors):
    "Their round trip only rounds: their very code agrees with ours until a refresh meets a singular factor"
    ours, peer = lenet64(), lenet64()
    run(ours, SOAP(ours.parameters()), batches[:11])  # the first refresh follows the 11th gradient
    authors_run(peer, authors.SOAP(peer.parameters()), batches[:11])
    assert max_diff(ours, peer) <= 1e-10  # measured 7.7e-12


def test_merged_shape_is_the_authors(authors):
    for shape in [(6, 1, 5, 5), (16, 6, 5, 5), (120, 16, 5, 5), (84, 120), (10, 84), (6,), (20000, 5), (3, 20000),
                  (2, 1, 7)]:
        for max_dim in (1, 5, 100, 1000, 10000):
            theirs = authors.SOAP([torch.zeros(1)]).merge_dims(torch.zeros(shape), max_dim).shape
            assert merged_shape(shape, max_dim) == list(theirs), (shape, max_dim)


# ---------- pytorch_optimizer's port ----------

def test_pytorch_optimizer_merge_dims_fails_on_lenet5():
    "Why the notebook gives the port the authors' merge: its merge of a shape that merges whole is [1]"
    assert [port_soap.merge_small_dims(s, 10000) for s in ([6], [6, 1, 5, 5], [10, 84])] == [[1]] * 3
    m = lenet64()
    x, y = torch.randn(4, 1, 32, 32, dtype=torch.float64), torch.zeros(4, dtype=torch.long)
    with pytest.raises(RuntimeError, match='invalid for input of size'):
        run(m, pytorch_optimizer.SOAP(m.parameters(), merge_dims=True), [(x, y)] * 2)


def test_equals_pytorch_optimizer_in_float32_channels_last(batches):
    "The weights as training holds them on the CPU: float32, channels_last"
    torch.manual_seed(0)
    ours = to_device(LeNet5(), 'cpu')
    peer = copy.deepcopy(ours)
    assert ours.feature_extractor[0].weight.is_contiguous(memory_format=torch.channels_last)
    b32 = [(xb.float(), yb) for xb, yb in batches]
    run(ours, SOAP(ours.parameters(), precondition_frequency=3, variant='pytorch_optimizer'), b32)
    run(peer, pytorch_optimizer.SOAP(peer.parameters(), precondition_frequency=3), b32)
    assert max_diff(ours, peer) == 0


# ---------- the convex quadratic of tests/test_optimizers.py ----------

def quadratic_losses(make, n=1000, seed=0):
    "Losses / the first on tests/test_optimizers.py's least squares, w from 0, `make(model)` the optimizer"
    torch.manual_seed(seed)
    X = torch.randn(64, 8, dtype=torch.float64)
    y = X @ (0.1 * torch.randn(8, dtype=torch.float64))
    m = nn.Linear(8, 1, bias=False).double()
    nn.init.zeros_(m.weight)
    opt, crit = make(m), lambda out, y: ((out.squeeze(1) - y)**2).mean() / 2
    losses = np.array([train_step(m, opt, X, y, crit)['loss'] for _ in range(n)])
    return losses / losses[0]


def test_quadratic_floor_is_adams():
    "SOAP's registry settings stop at a floor ~3e-7 of the start loss, not below 1e-8: with beta2 = 0.95 the second "
    "moment forgets in ~20 steps, so the step does not shrink with the gradient and w hops around w* at a distance "
    "∝ lr. AdamW with SOAP's lr, betas and weight decay has the same floor; it falls as lr²"
    soap = quadratic_losses(lambda m: make_optimizer('soap', m))
    adamw = quadratic_losses(lambda m: torch.optim.AdamW(m.parameters(), lr=3e-3, betas=(0.95, 0.95),
                                                         weight_decay=0.01))
    slow = quadratic_losses(lambda m: make_optimizer('soap', m, lr=1e-3))
    floor = lambda l: np.median(l[-200:])
    assert 1e-8 < soap.min() < 1e-7 and 1e-8 < adamw.min() < 1e-7  # measured 1.2e-8, 3.2e-8
    assert 1e-7 < floor(soap) < 1e-6 and 1e-7 < floor(adamw) < 1e-6  # measured 2.8e-7, 2.6e-7
    assert 5 < floor(soap) / floor(slow) < 20  # measured 10.6; (3e-3 / 1e-3)² = 9
