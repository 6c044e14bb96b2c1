"Bad arguments to data, model, hessian and optimizers: a ValueError naming the argument and its value; nothing changed"
import copy, re
from pathlib import Path
import pytest, torch, torch.nn.functional as F
from torch import nn
from secondorder_cnn.data import (TensorLoader, data_root, dataset_info, get_dls, load_tensors, resize32, resolve_device,
                                  stratified_subset, to_gray, tv_dataset, write_atomic)
from secondorder_cnn.model import LeNet5, evaluate, fit, n_params, to_device
from secondorder_cnn.hessian import HessianOperator, hutchinson_diag, hvp, probe
from secondorder_cnn.optimizers import (AdaHessian, Apollo, SophiaH, make_optimizer, preconditioner, stability_threshold,
                                        train_step)
from secondorder_cnn.runs import Tracker
from secondorder_cnn.landscape import path_between

nan, inf, CE = float('nan'), float('inf'), F.cross_entropy


def H(m, x, y): return HessianOperator(m, CE, data=(x, y))
def sgd(m): return torch.optim.SGD(m.parameters(), lr=0.1)
def ones(m): return [torch.ones_like(p) for p in m.parameters()]


def grads(m, x, y):
    "Gradients of the loss of `m` on `(x, y)`, built for Hessian-vector products, and the parameters"
    ps = list(m.parameters())
    return list(torch.autograd.grad(CE(m(x), y), ps, create_graph=True)), ps


def nan_weights():
    "A LeNet5 whose last bias holds a NaN"
    m = LeNet5()
    with torch.no_grad(): m.classifier[2].bias[3] = nan
    return m


OUTSIDE = torch.ones(3, requires_grad=True)  # a tensor that requires grad but is no parameter of the model

# Each row: a call on a model `m` and a batch `x`, `y`, and the text its ValueError must contain (the argument's name
# and its bad value). The rows are grouped by the kind of mistake.
TABLE = {
    'integer given as a float, a string or a bool': [
        (lambda m, x, y: get_dls('digits', bs=64.0), 'bs 64.0 must be an integer >= 1'),
        (lambda m, x, y: TensorLoader(x, y, bs='4'), "bs '4' must be an integer >= 1"),
        (lambda m, x, y: get_dls('digits', n_train=100.0), 'n_train 100.0 must be an integer >= 1'),
        (lambda m, x, y: stratified_subset(y, 2.5), 'n 2.5 must be an integer >= 1'),
        (lambda m, x, y: LeNet5(in_channels='1'), "in_channels '1' must be an integer >= 1"),
        (lambda m, x, y: LeNet5(n_classes=10.0), 'n_classes 10.0 must be an integer >= 1'),
        (lambda m, x, y: fit(m, sgd(m), [(x, y)], [(x, y)], epochs=2.0), 'epochs 2.0 must be an integer >= 1'),
        (lambda m, x, y: H(m, x, y).eigenvalues(top_n=2.0), 'top_n 2.0 must be an integer >= 1'),
        (lambda m, x, y: H(m, x, y).eigenvalues(max_iter='100'), "max_iter '100' must be an integer >= 1"),
        (lambda m, x, y: H(m, x, y).trace(max_hvp=30.0), 'max_hvp 30.0 must be an integer >= 1'),
        (lambda m, x, y: H(m, x, y).trace(n_lowrank=True), 'n_lowrank True must be an integer >= 1'),
        (lambda m, x, y: H(m, x, y).density(n_iter=10.0), 'n_iter 10.0 must be an integer >= 1'),
        (lambda m, x, y: H(m, x, y).density(n_runs='2'), "n_runs '2' must be an integer >= 1"),
        (lambda m, x, y: H(m, x, y).density(n_grid=100.5), 'n_grid 100.5 must be an integer >= 2'),
        (lambda m, x, y: H(m, x, y).dense(chunk=8.0), 'chunk 8.0 must be an integer >= 1'),
        (lambda m, x, y: H(m, x, y).dense(max_params=1e5), 'max_params 100000.0 must be an integer >= 1'),
        (lambda m, x, y: hutchinson_diag(*grads(m, x, y), n=2.0), 'n 2.0 must be an integer >= 1'),
        (lambda m, x, y: AdaHessian(m.parameters(), update_each=2.0), 'update_each 2.0 must be an integer >= 1'),
        (lambda m, x, y: SophiaH(m.parameters(), n_probes=True), 'n_probes True must be an integer >= 1'),
        (lambda m, x, y: make_optimizer('lbfgs', m.parameters(), history_size=5.0),
         'history_size 5.0 must be an integer >= 1'),
        (lambda m, x, y: make_optimizer('lbfgs', m.parameters(), max_iter='4'), "max_iter '4' must be an integer >= 1"),
    ],
    'seed outside 0..2**32-1 or not an integer': [
        (lambda m, x, y: get_dls('digits', seed=-1), 'seed -1 must be an integer in 0..4294967295'),
        (lambda m, x, y: TensorLoader(x, y, seed=2**32), 'seed 4294967296 must be an integer in 0..4294967295'),
        (lambda m, x, y: stratified_subset(y, 4, seed=1.0), 'seed 1.0 must be an integer in 0..4294967295'),
        (lambda m, x, y: H(m, x, y).eigenvalues(seed=-1), 'seed -1 must be an integer in 0..4294967295'),
        (lambda m, x, y: H(m, x, y).trace(seed=2**64), 'seed 18446744073709551616 must be an integer in 0..4294967295'),
        (lambda m, x, y: H(m, x, y).density(seed='0'), "seed '0' must be an integer in 0..4294967295"),
        (lambda m, x, y: AdaHessian(m.parameters(), seed=-1), 'seed -1 must be an integer in 0..4294967295'),
        (lambda m, x, y: make_optimizer('adam', m.parameters(), seed=True), 'seed True must be an integer in 0..'),
    ],
    'tolerance, width or rate negative, NaN or infinite': [
        (lambda m, x, y: H(m, x, y).eigenvalues(tol=-1e-3), 'tol -0.001 must be a finite number > 0'),
        (lambda m, x, y: H(m, x, y).eigenvalues(method='power', tol=nan), 'tol nan must be a finite number > 0'),
        (lambda m, x, y: H(m, x, y).trace(rtol=-0.1), 'rtol -0.1 must be a finite number > 0'),
        (lambda m, x, y: H(m, x, y).density(sigma=-1.0), 'sigma -1.0 must be a finite number > 0'),
        (lambda m, x, y: H(m, x, y).density(sigma=inf), 'sigma inf must be a finite number > 0'),
        (lambda m, x, y: make_optimizer('sgd', m.parameters(), momentum=nan), 'momentum nan must be in [0, 1)'),
        (lambda m, x, y: make_optimizer('sgd', m.parameters(), lr=nan), 'lr nan must be a finite number >= 0'),
        (lambda m, x, y: make_optimizer('adam', m.parameters(), eps=-1e-8), 'eps -1e-08 must be a finite number >= 0'),
        (lambda m, x, y: make_optimizer('adam', m.parameters(), weight_decay=inf),
         'weight_decay inf must be a finite number >= 0'),
        (lambda m, x, y: make_optimizer('lbfgs', m.parameters(), tolerance_grad=-1.0),
         'tolerance_grad -1.0 must be a finite number >= 0'),
        (lambda m, x, y: SophiaH(m.parameters(), gamma=nan), 'gamma nan must be a finite number >= 0'),
        (lambda m, x, y: AdaHessian(m.parameters(), hessian_power=nan), 'hessian_power nan must be in [0, 1]'),
        (lambda m, x, y: Apollo(m.parameters(), init_lr=-1e-5), 'init_lr -1e-05 must be a finite number >= 0'),
        (lambda m, x, y: Apollo(m.parameters(), warmup=inf), 'warmup inf must be a finite number >= 0'),
        (lambda m, x, y: Apollo(m.parameters(), sigma=-1.0), 'sigma -1.0 must be a finite number > 0'),
    ],
    'setting of the wrong length or kind': [
        (lambda m, x, y: AdaHessian(m.parameters(), betas=(0.9,)), 'betas (0.9,) must be a pair of numbers in [0, 1)'),
        (lambda m, x, y: SophiaH(m.parameters(), betas=(0.96, 0.99, 0.999)),
         'betas (0.96, 0.99, 0.999) must be a pair of numbers in [0, 1)'),
        (lambda m, x, y: make_optimizer('adam', m.parameters(), betas=0.9), 'betas 0.9 must be a pair of numbers'),
        (lambda m, x, y: Apollo(m.parameters(), beta=(0.9, 0.99)), 'beta (0.9, 0.99) must be one number in [0, 1)'),
        (lambda m, x, y: make_optimizer('adahessian', m.parameters(), betas=(0.9, nan)), 'betas[1] nan must be in [0, 1)'),
        (lambda m, x, y: make_optimizer('adam', m.parameters(), amsgrad='yes'), "amsgrad 'yes' must be True or False"),
        (lambda m, x, y: make_optimizer('sgd', m.parameters(), nesterov=1), 'nesterov 1 must be True or False'),
        (lambda m, x, y: make_optimizer('lbfgs', m.parameters(), line_search_fn='armijo'),
         "line_search_fn 'armijo' is not allowed; allowed: None, 'strong_wolfe'"),
        (lambda m, x, y: AdaHessian(m.parameters(), generator=0), 'generator 0 must be a torch.Generator or None'),
    ],
    'Hessian of bad data, model or criterion': [
        (lambda m, x, y: HessianOperator(m, CE, data=x),
         'data <float32 tensor of shape (8, 1, 32, 32)> must be a pair (x, y) of tensors'),
        (lambda m, x, y: HessianOperator(m, CE, data=(x, y[:5])), 'x and y must hold as many samples; got 8 and 5'),
        (lambda m, x, y: HessianOperator(m, CE, data=(x.numpy(), y)), 'x <float32 array of shape (8, 1, 32, 32)> must be a tensor'),
        (lambda m, x, y: HessianOperator(m, CE, data=(x / 0, y)),
         'data: x <float32 tensor of shape (8, 1, 32, 32)> holds NaN or inf'),
        (lambda m, x, y: HessianOperator(m, CE, data=(x[:0], y[:0])), 'data is empty: expected at least one sample'),
        (lambda m, x, y: HessianOperator(nan_weights(), CE, data=(x, y)),
         'model holds weights that are not finite (NaN or inf): classifier.2.bias'),
        (lambda m, x, y: HessianOperator(m, lambda out, t: CE(out, t).detach(), data=(x, y)),
         'the loss depends on no trainable parameter of the model (criterion <function <lambda>'),
        (lambda m, x, y: HessianOperator(m, lambda out, t: (OUTSIDE**2).sum(), data=(x, y)),
         'the loss depends on no trainable parameter of the model (criterion <function <lambda>'),
        (lambda m, x, y: HessianOperator(m, lambda out, t: 0.5, data=(x, y)),
         'criterion must return a scalar loss tensor, got 0.5'),
        (lambda m, x, y: HessianOperator(m, 'cross_entropy', data=(x, y)),
         "criterion 'cross_entropy' must be a function of (outputs, targets)"),
        (lambda m, x, y: HessianOperator('lenet5', CE, data=(x, y)), "model 'lenet5' must be a torch.nn.Module"),
        (lambda m, x, y: HessianOperator(m, CE, data=(x, y), progress='yes'), "progress 'yes' must be True or False"),
        (lambda m, x, y: HessianOperator(m, CE, dataloader=iter([(x, y)])), 'dataloader <list_iterator object at '),
        (lambda m, x, y: HessianOperator(m, CE, dataloader=[x]),
         'a batch of the dataloader <float32 tensor of shape (8, 1, 32, 32)> must be a pair (x, y) of tensors'),
        (lambda m, x, y: H(m, x, y).eigenvalues(top_n=61_707),
         'top_n=61707 must be between 1 and the number of parameters, 61,706'),
        (lambda m, x, y: H(m, x, y).hvp([torch.full_like(p, nan) for p in m.parameters()]),
         'v holds values that are not finite (NaN or inf)'),
        (lambda m, x, y: H(m, x, y).hvp(ones(m)[:-1]), 'v: expected 10 tensors shaped'),
    ],
    'hvp, hutchinson_diag and probe': [
        (lambda m, x, y: probe(x, 'uniform'), "dist 'uniform' is not allowed; allowed: 'rademacher', 'gaussian'"),
        (lambda m, x, y: probe(x, gen=0), 'gen 0 must be a torch.Generator or None'),
        (lambda m, x, y: probe(x, shape=(2, -1)), 'shape (2, -1) must be a tuple of integers >= 0'),
        (lambda m, x, y: probe('p'), "p 'p' must be a tensor"),
        (lambda m, x, y: hvp(*grads(m, x, y), ones(m)[:-1]), 'grads, params and vs must be as many; got 10, 10 and 9'),
        (lambda m, x, y: hvp(*grads(m, x, y), [torch.ones(3)] * 10),
         'vs[0] <float32 tensor of shape (3,)> must be a tensor shaped like grads[0], (6, 1, 5, 5)'),
        (lambda m, x, y: hvp(*grads(m, x, y), ones(m), batched='no'), "batched 'no' must be True or False"),
        (lambda m, x, y: hutchinson_diag(*grads(m, x, y), dist='uniform'), "dist 'uniform' is not allowed"),
        (lambda m, x, y: hutchinson_diag(*grads(m, x, y), n=0), 'n 0 must be an integer >= 1'),
        (lambda m, x, y: hutchinson_diag(grads(m, x, y)[0], list(m.parameters())[:-1]),
         'grads, params and vs must be as many; got 10, 9 and 9'),
        (lambda m, x, y: hutchinson_diag(*grads(m, x, y), gen=1), 'gen 1 must be a torch.Generator or None'),
    ],
    'data: labels, pairs, flags, devices, names, paths': [
        (lambda m, x, y: stratified_subset(y.float(), 4),
         'y <float32 tensor of shape (8,)> must be a 1-D tensor of integer labels >= 0'),
        (lambda m, x, y: stratified_subset(y[:, None], 4), 'y <int64 tensor of shape (8, 1)> must be a 1-D tensor'),
        (lambda m, x, y: stratified_subset(y - 10, 4), 'y <int64 tensor of shape (8,)> must be a 1-D tensor of integer labels >= 0'),
        (lambda m, x, y: TensorLoader(x, y[:5]), 'x and y must hold as many samples; got 8 and 5'),
        (lambda m, x, y: TensorLoader(x, list(range(8))),
         'y [0, 1, 2, 3, 4, 5, 6, 7] must be a tensor whose first dimension counts the samples'),
        (lambda m, x, y: TensorLoader(x[:0], y[:0]), 'x and y hold no sample'),
        (lambda m, x, y: TensorLoader(x, y, shuffle='yes'), "shuffle 'yes' must be True or False"),
        (lambda m, x, y: load_tensors('digits', train='test'), "train 'test' must be True or False"),
        (lambda m, x, y: load_tensors('mnist', download='no'), "download 'no' must be True or False"),
        (lambda m, x, y: resolve_device('meta'), "device 'meta' cannot train a model here; allowed: cpu, cuda"),
        (lambda m, x, y: resolve_device('xla'), "device 'xla' cannot train a model here"),
        (lambda m, x, y: get_dls('digits', device='privateuseone'), "device 'privateuseone' cannot train a model here"),
        (lambda m, x, y: resolve_device(True), 'unknown device True; allowed: cpu, cuda, cuda:<index>, mps'),
        (lambda m, x, y: resolve_device('cuda:99'), "device 'cuda:99' asked for, but"),
        (lambda m, x, y: dataset_info(3), 'unknown dataset 3; allowed: mnist, fashion_mnist, cifar10, digits'),
        (lambda m, x, y: get_dls(['digits']), "unknown dataset ['digits']"),
        (lambda m, x, y: tv_dataset('digits'), "dataset 'digits' is not allowed; allowed: 'mnist', 'fashion_mnist', 'cifar10'"),
        (lambda m, x, y: to_gray(x.numpy()), 'x <float32 array of shape (8, 1, 32, 32)> must be uint8 RGB images (N, H, W, 3)'),
        (lambda m, x, y: resize32(x[:, 0]), 'x <float32 tensor of shape (8, 32, 32)> must be a non-empty uint8 tensor'),
        (lambda m, x, y: data_root(3), 'root 3 must be a path: a str or a Path'),
        (lambda m, x, y: write_atomic('text', Path('f.txt')), "write 'text' must be a function of the temporary path"),
    ],
    'model: sizes, loaders, epochs, devices': [
        (lambda m, x, y: LeNet5(in_channels=0), 'in_channels 0 must be an integer >= 1'),
        (lambda m, x, y: n_params('m'), "model 'm' must be a torch.nn.Module"),
        (lambda m, x, y: evaluate(m, []), 'dl [] holds no sample'),
        (lambda m, x, y: evaluate(m, 'batches'), "dl 'batches' must be an iterable of batches (xb, yb)"),
        (lambda m, x, y: evaluate(m, [(x, y)], criterion=None), 'criterion None must be a function of (outputs, targets)'),
        (lambda m, x, y: fit(m, sgd(m), [(x, y)], [(x, y)], epochs=0), 'epochs 0 must be an integer >= 1'),
        (lambda m, x, y: fit(m, 'adam', [(x, y)], [(x, y)], 1), "opt 'adam' must be a torch.optim.Optimizer"),
        (lambda m, x, y: fit(m, sgd(m), [(x, y)], [], 1), 'tst [] holds no sample'),
        (lambda m, x, y: fit(m, sgd(m), [(x, y)], [(x, y)], 1, log='print'),
         "log 'print' must be a function of each epoch's record"),
        (lambda m, x, y: to_device(m, 'meta'), "device 'meta' cannot train a model here"),
    ],
    'optimizers: parameters, names, batches': [
        (lambda m, x, y: make_optimizer('adam', []), 'params [] must be tensors or parameter groups, one at least'),
        (lambda m, x, y: make_optimizer('sgd', 5), 'params 5 must be tensors or parameter groups'),
        (lambda m, x, y: Apollo(['w']), "params ['w'] must be tensors or parameter groups"),
        (lambda m, x, y: AdaHessian([{'params': []}]), 'params holds no tensor: there is nothing to optimize'),
        (lambda m, x, y: make_optimizer('Adam', m.parameters()), "optimizer 'Adam' is not allowed; allowed: 'adam'"),
        (lambda m, x, y: make_optimizer('apollo', m.parameters(), momentum=0.9), "apollo has no setting 'momentum'"),
        (lambda m, x, y: train_step(m, sgd(m), x, y[:5]), 'xb and yb must hold as many samples; got 8 and 5'),
        (lambda m, x, y: train_step(m, sgd(m), x[:0], y[:0]), 'xb and yb hold no sample'),
        (lambda m, x, y: train_step(m, sgd(m), x.numpy(), y), 'xb <float32 array of shape (8, 1, 32, 32)> must be a tensor'),
        (lambda m, x, y: train_step(m, 'sgd', x, y), "opt 'sgd' must be an optimizer"),
        (lambda m, x, y: train_step(m, sgd(m), x, y, create_graph='yes'), "create_graph 'yes' must be True or False"),
        (lambda m, x, y: train_step(m, sgd(m), x, y, nn.CrossEntropyLoss(reduction='none')),
         'criterion must return a scalar loss, got <float32 tensor of shape (8,)>'),
        (lambda m, x, y: train_step(m, make_optimizer('lbfgs', m.parameters()), x, y, nn.CrossEntropyLoss(reduction='none')),
         'criterion must return a scalar loss, got <float32 tensor of shape (8,)>'),
    ],
    'what is not an optimizer, a model, a batch or an image of the right size': [
        (lambda m, x, y: stability_threshold(None), 'opt None must be an optimizer'),
        (lambda m, x, y: stability_threshold(m), 'opt LeNet5(\n'),
        (lambda m, x, y: preconditioner(None), 'opt None must be an optimizer'),
        (lambda m, x, y: preconditioner('adam'), "opt 'adam' must be an optimizer"),
        (lambda m, x, y: Tracker(None, None, 1), 'x None must be a tensor'),
        (lambda m, x, y: Tracker(x, y[:3], 1), 'x and y must hold as many samples'),
        (lambda m, x, y: Tracker(x, y, 1, trace=1), 'trace 1 must be 0 (no trace) or an integer >= 3'),
        (lambda m, x, y: path_between(m, None, x, y), 'other None must be a torch.nn.Module'),
        (lambda m, x, y: m(torch.zeros(2, 1, 28, 28)), 'LeNet5 takes images of shape (N, 1, 32, 32), not'),
        (lambda m, x, y: m(torch.zeros(2, 3, 32, 32)), 'LeNet5 takes images of shape (N, 1, 32, 32)'),
        (lambda m, x, y: H(m, torch.zeros(8, 1, 28, 28), y), 'resize them to 32×32'),
        (lambda m, x, y: evaluate(m, [(torch.zeros(8, 28, 28), y)]), 'LeNet5 takes images of shape'),
        (lambda m, x, y: H(m, x, y).sharpness([torch.full_like(p, nan) for p in m.parameters()]),
         'v0 must be finite and not zero'),
        (lambda m, x, y: H(m, x, y).preconditioned([torch.full_like(p, inf) for p in m.parameters()]),
         'P must hold finite numbers > 0'),
    ],
}
CASES = [pytest.param(call, text, id=f'{kind} {i}') for kind, rows in TABLE.items() for i, (call, text) in enumerate(rows)]


@pytest.fixture
def model():
    torch.manual_seed(0)
    return LeNet5()


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.rand(8, 1, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)


def unchanged(model, state, x, y, xy) -> bool:
    "Whether `model` has the weights of `state`, no gradients and its training mode, and `x`, `y` are as copied in `xy`"
    weights = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), state.values()))
    return weights and model.training and all(p.grad is None for p in model.parameters()) and \
        torch.equal(x, xy[0]) and torch.equal(y, xy[1])


@pytest.mark.parametrize('call, text', CASES)
def test_a_bad_argument_is_a_value_error_that_names_it(call, text, model, batch):
    x, y = batch
    state, xy = copy.deepcopy(model.state_dict()), (x.clone(), y.clone())
    with pytest.raises(ValueError, match=re.escape(text)): call(model, x, y)
    assert unchanged(model, state, x, y, xy)


def test_a_nan_in_a_later_batch_stops_the_first_product_it_spoils(model, batch):
    "Only the first batch of a dataloader is checked; a NaN after it is an error of the products, never a NaN result"
    x, y = batch
    state, xy = copy.deepcopy(model.state_dict()), (x.clone(), y.clone())
    Hl = HessianOperator(model, CE, dataloader=[(x, y), (x / 0, y)])
    for call in (lambda: Hl.trace(max_hvp=6), lambda: Hl.eigenvalues(), lambda: Hl.density(n_iter=3, n_runs=1)):
        with pytest.raises(ValueError, match=r'the Hessian-vector products are not finite \(NaN or inf\)'): call()
    assert unchanged(model, state, x, y, xy)


def test_sgd_with_full_dampening_has_no_threshold(model):
    "Dampening 1 keeps the momentum from moving: no step, so no stability threshold (it was a division by zero)"
    opt = make_optimizer('sgd', model.parameters(), momentum=0.9, dampening=1.0)
    assert stability_threshold(opt) is None


def test_sharpness_and_preconditioning_of_extreme_scale_are_right_and_converged(model, batch):
    "A v0 whose norm overflows float32, and diagonal P of 1e-20 or 1e20: λ1 as from a plain start, times 1/P"
    x, y = batch
    h = H(model, x, y)
    ref = h.sharpness(max_iter=60, tol=1e-6)
    big = h.sharpness([torch.full_like(p, 1e30) for p in h.params], max_iter=60, tol=1e-6)
    assert big.converged and abs(big[0] - ref[0]) <= 1e-3 * ref[0]
    for c in (1e-20, 1e20):
        r = h.preconditioned([torch.full_like(p, c) for p in h.params]).sharpness(max_iter=60, tol=1e-6)
        assert r.converged and abs(r[0] * c - ref[0]) <= 1e-3 * ref[0], (c, r[0] * c, ref[0])
