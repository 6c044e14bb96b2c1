import copy, io, math
import pytest, torch, torch.nn.functional as F
from torch import nn
import torch_optimizer, pytorch_optimizer
from secondorder_cnn.data import get_dls
from secondorder_cnn.model import LeNet5, to_device
from secondorder_cnn.optimizers import OPTIMIZERS, REBOUNDS, AdaHessian, Apollo, LBFGS, SophiaH, make_optimizer, train_step
from twins import digit_batches, least_squares, lenet64, max_diff, run


@pytest.fixture(scope='module')
def batches(): return digit_batches()


# ---------- identity with the peers, float64, 20 steps, same probes ----------

@pytest.mark.parametrize('kw', [dict(), dict(hessian_power=0.5), dict(weight_decay=1e-2, lr=0.05)])
def test_adahessian_equals_torch_optimizer(batches, kw):
    ours, peer = lenet64(), lenet64()
    run(ours, AdaHessian(ours.parameters(), seed=3, **kw), batches)
    torch.manual_seed(3)
    run(peer, torch_optimizer.Adahessian(peer.parameters(), **{'hessian_power': 1, **kw}), batches, create_graph=True)
    assert max_diff(ours, lenet64()) > 0.1
    assert max_diff(ours, peer) <= 1e-10


@pytest.mark.parametrize('warmup', [0, 100])
@pytest.mark.parametrize('wd', [0., 1e-3])
def test_apollo_2021_equals_torch_optimizer(batches, warmup, wd):
    ours, peer = lenet64(), lenet64()
    run(ours, Apollo(ours.parameters(), lr=0.5, sigma=1, warmup=warmup, init_lr=0.01, weight_decay=wd), batches)
    run(peer, torch_optimizer.Apollo(peer.parameters(), lr=0.5, warmup=warmup, init_lr=0.01, weight_decay=wd), batches)
    assert max_diff(ours, lenet64()) > 1e-3
    assert max_diff(ours, peer) <= 1e-10


@pytest.mark.parametrize('rebound', REBOUNDS)
@pytest.mark.parametrize('wdt', ['L2', 'decoupled', 'stable'])
def test_apollo_current_equals_apollodqn(batches, rebound, wdt):
    ours, peer = lenet64(), lenet64()
    run(ours, Apollo(ours.parameters(), rebound=rebound, warmup=0, weight_decay=1e-2, weight_decay_type=wdt), batches)
    run(peer, pytorch_optimizer.ApolloDQN(peer.parameters(), rebound=rebound, warmup_steps=0, weight_decay=1e-2,
                                          weight_decay_type=wdt.lower()), batches)
    assert max_diff(ours, lenet64()) > 1e-3
    assert max_diff(ours, peer) <= 1e-10


def test_apollodqn_warms_up_one_step_ahead(batches):
    "The deviation that keeps ApolloDQN's comparison at warmup 0: its first step already uses the second warmup rate"
    ours, peer = lenet64(), lenet64()
    run(ours, Apollo(ours.parameters(), warmup=10, init_lr=1e-3), batches[:1])
    run(peer, pytorch_optimizer.ApolloDQN(peer.parameters(), warmup_steps=10, init_lr=1e-3), batches[:1])
    start = lenet64()
    moved = [(o - s).abs().max().item() / (q - s).abs().max().item() for o, q, s in zip(ours.parameters(), peer.parameters(), start.parameters())]
    assert moved == pytest.approx([1e-3 / (1e-3 + (0.01 - 1e-3) / 10)] * len(moved), rel=1e-9)


class PeerSophia:
    "`pytorch_optimizer.SophiaH` fed, on the refresh steps, u ⊙ Hu with the probes an identically seeded generator draws"
    def __init__(self, params, seed, k=10, dist='gaussian', **kw):
        self.opt = pytorch_optimizer.SophiaH(params, update_period=k, **kw)
        self.param_groups, self.gen, self.k, self.dist, self.t = self.opt.param_groups, torch.Generator().manual_seed(seed), k, dist, 0
        self.state = self.opt.state  # where train_step keeps its copy of the weights
    @property
    def create_graph(self): return self.t % self.k == 0
    def step(self, closure):
        closure()
        ps, h = self.param_groups[0]['params'], None
        if self.create_graph:
            us = [torch.randn(p.shape, generator=self.gen, dtype=p.dtype) if self.dist == 'gaussian'
                  else 2 * torch.randint(0, 2, p.shape, generator=self.gen, dtype=p.dtype) - 1 for p in ps]
            h = [u * hu for u, hu in zip(us, torch.autograd.grad([p.grad for p in ps], ps, us))]
        self.t += 1
        self.opt.step(hessian=h)


@pytest.mark.parametrize('kw', [dict(), dict(update_each=3, dist='rademacher'), dict(weight_decay=0.1, lr=0.5, gamma=0.05)])
def test_sophiah_equals_pytorch_optimizer(batches, kw):
    ours, peer = lenet64(), lenet64()
    run(ours, SophiaH(ours.parameters(), seed=4, **kw), batches)
    pk = {k: v for k, v in kw.items() if k in ('weight_decay', 'lr')} | ({'p': kw['gamma']} if 'gamma' in kw else {})
    run(peer, PeerSophia(peer.parameters(), 4, kw.get('update_each', 10), kw.get('dist', 'gaussian'), **pk), batches)
    assert max_diff(ours, lenet64()) > 1e-3
    assert max_diff(ours, peer) <= 1e-10


def test_lbfgs_equals_torch_and_accepts_channels_last():
    x, y = torch.randn(32, 1, 32, 32), torch.randint(0, 10, (32,))
    torch.manual_seed(0)
    a = LeNet5()
    b, c = copy.deepcopy(a), to_device(copy.deepcopy(a), 'cpu')
    for m, cls in ((a, torch.optim.LBFGS), (b, LBFGS), (c, LBFGS)):
        opt = cls(m.parameters(), history_size=5, max_iter=4, line_search_fn='strong_wolfe')
        for _ in range(3): train_step(m, opt, x, y)
    assert max_diff(a, b) == 0
    assert max_diff(a, lenet64().float()) > 0.1 and max_diff(a, c) < 1e-3


def test_adahessian_update_each_reuses_the_estimate(batches):
    m = lenet64()
    opt = AdaHessian(m.parameters(), update_each=3, seed=0)
    w = m.classifier[2].weight
    hs, graphs = [], []
    for xb, yb in batches[:7]:
        graphs.append(opt.create_graph)
        r = train_step(m, opt, xb, yb)
        hs.append(opt.state[w]['hess'].clone())
        assert r['n_hvp'] == int(graphs[-1])
    assert graphs == [True, False, False, True, False, False, True]
    assert torch.equal(hs[0], hs[2]) and not torch.equal(hs[2], hs[3])
    assert opt.state[m.feature_extractor[0].weight]['hess'].shape == (6, 1, 1, 1)


def test_adahessian_on_channels_last_matches_contiguous():
    "Same probes whatever the layout; AdaHessian's eps 1e-4 amplifies float32 rounding, so one step is compared"
    x, y = torch.randn(64, 1, 32, 32), torch.randint(0, 10, (64,))
    torch.manual_seed(0)
    a = LeNet5()
    c, start = to_device(copy.deepcopy(a), 'cpu'), copy.deepcopy(a)
    oa, oc = AdaHessian(a.parameters(), seed=0), AdaHessian(c.parameters(), seed=0)
    train_step(a, oa, x, y); train_step(c, oc, x, y)
    assert c.feature_extractor[0].weight.is_contiguous(memory_format=torch.channels_last)
    for p, q in zip(a.parameters(), c.parameters()):
        u, v = oa.state[p]['hess'], oc.state[q]['hess']
        assert (u - v).abs().max() <= 1e-4 * u.abs().max()
    assert max_diff(a, c) < 1e-3 * max_diff(a, start)


# ---------- convergence ----------

# K-FAC's empirical Fisher vanishes at an exact fit (G = mean residual² -> 0), so P -> λI and its step -> (η/λ)∇: stable
# on this H (λ1 = 1.71) only if λ > η λ1 / (2 + 2μ) = 0.045; at the registry's 0.003 the loss cycles, 1e-4 to 0.05
QUADRATIC = {'kfac': dict(damping=0.1)}
# SOAP's β2 = 0.95 forgets the second moment within ~20 steps: near w* its normalised step stops shrinking and the loss
# hovers at a floor ∝ lr² (AdamW with the same lr, betas and weight decay stops at 3e-8 as well); a broken SOAP gives 0.7
QUADRATIC_FLOOR = {'soap': 1e-6}

@pytest.mark.parametrize('name', OPTIMIZERS)
def test_converges_on_a_convex_quadratic(name):
    "Least squares ½ mean((Xw - y)²) with an exact solution w*: the loss falls below 1e-8 of its start"
    losses, err, _ = least_squares(lambda m: make_optimizer(name, m, **QUADRATIC.get(name, {})))
    assert min(losses) < QUADRATIC_FLOOR.get(name, 1e-8) * losses[0]
    assert err < 1e-3


@pytest.mark.parametrize('name', OPTIMIZERS)
def test_lowers_lenet5_loss_in_20_steps(name):
    trn, _ = get_dls('digits', bs=128, device='cpu')
    bs = [b for b, _ in zip(trn, range(20))]
    x, y = torch.cat([b[0] for b in bs]), torch.cat([b[1] for b in bs])
    torch.manual_seed(0)
    m = LeNet5()
    loss = lambda: F.cross_entropy(m(x), y).item()
    before = loss()
    opt = make_optimizer(name, m)
    hist = [train_step(m, opt, xb, yb) for xb, yb in bs]
    assert not any(h['diverged'] for h in hist)
    assert loss() < before


# ---------- resuming ----------

@pytest.mark.parametrize('name', OPTIMIZERS)
def test_state_dict_round_trip(batches, name):
    "10 steps, save, reload into a fresh model and optimizer, 10 more: the weights of 20 straight steps"
    a = lenet64()
    torch.manual_seed(5)
    run(a, make_optimizer(name, a), batches)
    b = lenet64()
    torch.manual_seed(5)
    opt = make_optimizer(name, b)
    run(b, opt, batches[:10])
    buf = io.BytesIO()
    torch.save({'model': b.state_dict(), 'opt': opt.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf)
    c = lenet64(seed=1)
    c.load_state_dict(ck['model'])
    torch.manual_seed(6)
    opt = make_optimizer(name, c)
    opt.load_state_dict(ck['opt'])
    run(c, opt, batches[10:])
    assert max_diff(a, lenet64()) > 0
    assert max_diff(a, c) == 0


def test_resuming_without_the_generator_state_draws_other_probes(batches):
    a, b = lenet64(), lenet64()
    oa, ob = AdaHessian(a.parameters(), seed=0), AdaHessian(b.parameters(), seed=0)
    run(a, oa, batches[:2]); run(b, ob, batches[:2])
    sd = ob.state_dict()
    sd.pop('generator')
    ob = AdaHessian(b.parameters(), seed=0)
    ob.load_state_dict(sd)
    run(a, oa, batches[2:4]); run(b, ob, batches[2:4])
    assert max_diff(a, b) > 0


# ---------- divergence ----------

def test_nan_loss_restores_the_last_good_weights():
    torch.manual_seed(0)
    x, y = torch.randn(16, 1, 32, 32), torch.randint(0, 10, (16,))
    m = LeNet5()
    opt = make_optimizer('adam', m)
    train_step(m, opt, x, y)
    good = [p.detach().clone() for p in m.parameters()]
    train_step(m, opt, x, y)
    state = copy.deepcopy(opt.state_dict())
    r = train_step(m, opt, x, y, criterion=lambda out, y: F.cross_entropy(out, y) * float('nan'))
    assert r['diverged'] and math.isnan(r['loss']) and r['n_loss_evals'] == 1
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), good))
    assert all(p.grad is None for p in m.parameters())
    assert all(torch.equal(a, b) for a, b in zip(opt.state_dict()['state'][0].values(), state['state'][0].values()))


def test_nonfinite_weights_after_a_step_are_rolled_back():
    torch.manual_seed(0)
    x, y = torch.randn(16, 1, 32, 32), torch.randint(0, 10, (16,))
    m = LeNet5()
    start = [p.detach().clone() for p in m.parameters()]
    opt = make_optimizer('sgd', m, lr=1e6, momentum=0)
    r = train_step(m, opt, x, y, criterion=lambda out, y: F.cross_entropy(out, y) * 1e37)
    assert r['diverged'] and math.isfinite(r['loss'])
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), start))


def test_nan_at_the_first_step_leaves_the_weights():
    m = LeNet5()
    start = [p.detach().clone() for p in m.parameters()]
    r = train_step(m, make_optimizer('lbfgs', m), torch.full((4, 1, 32, 32), float('nan')), torch.zeros(4, dtype=torch.long))
    assert r['diverged'] and r['n_loss_evals'] == 1
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), start))


def test_lbfgs_history_is_reset_after_divergence():
    torch.manual_seed(0)
    x, y = torch.randn(16, 1, 32, 32), torch.randint(0, 10, (16,))
    m = LeNet5()
    opt = make_optimizer('lbfgs', m)
    train_step(m, opt, x, y)
    assert opt.state[opt._params[0]]['n_iter'] > 0
    n = [0]
    def crit(out, y):
        n[0] += 1
        return F.cross_entropy(out, y) * (float('inf') if n[0] == 3 else 1.)
    r = train_step(m, opt, x, y, criterion=crit)
    assert r['diverged'] and r['n_loss_evals'] == 3
    assert len(opt.state) == 0
    r = train_step(m, opt, x, y)
    assert not r['diverged'] and opt.state[opt._params[0]]['n_iter'] > 0


# ---------- bad input ----------

ps = lambda: LeNet5().parameters()

@pytest.mark.parametrize('make, match', [
    (lambda: AdaHessian(ps(), lr=-0.1), 'lr -0.1 must be a finite number >= 0'),
    (lambda: AdaHessian(ps(), lr=float('nan')), 'lr nan must be a finite number'),
    (lambda: Apollo(ps(), lr=float('inf')), 'lr inf must be a finite number'),
    (lambda: SophiaH(ps(), lr=-1), 'lr -1 must be'),
    (lambda: make_optimizer('adam', ps(), lr=float('inf')), 'lr inf must be'),
    (lambda: make_optimizer('lbfgs', ps(), lr=-1.), r'lr -1.0 must be'),
    (lambda: AdaHessian(ps(), betas=(0.9, 1.0)), r'betas\[1\] 1.0 must be in \[0, 1\)'),
    (lambda: SophiaH(ps(), betas=(-0.1, 0.99)), r'betas\[0\] -0.1 must be in \[0, 1\)'),
    (lambda: Apollo(ps(), beta=1), r'beta 1 must be in \[0, 1\)'),
    (lambda: make_optimizer('adam', ps(), betas=(0.9, 1.5)), r'betas\[1\] 1.5'),
    (lambda: make_optimizer('Adam', ps()), "optimizer 'Adam' is not allowed; allowed: 'adam', 'sgd', 'lbfgs', 'adahessian', 'apollo', 'apollo-2023', 'sophiah', 'muon', 'kfac', 'shampoo', 'soap', 'kron'"),
    (lambda: make_optimizer('apollo', ps(), momentum=0.9), "apollo has no setting 'momentum'; allowed: lr, beta, eps, rebound, sigma"),
    (lambda: Apollo(ps(), rebound='adaptive'), "rebound 'adaptive' is not allowed; allowed: 'constant', 'belief'"),
    (lambda: Apollo(ps(), weight_decay_type='l1'), "weight_decay_type 'l1' is not allowed; allowed: 'L2', 'decoupled', 'stable'"),
    (lambda: Apollo(ps(), sigma=0), 'sigma 0 must be a finite number > 0'),
    (lambda: Apollo(ps(), weight_decay=-1e-4), 'weight_decay -0.0001 must be'),
    (lambda: AdaHessian(ps(), hessian_power=2), r'hessian_power 2 must be in \[0, 1\]'),
    (lambda: AdaHessian(ps(), update_each=0), 'update_each 0 must be an integer >= 1'),
    (lambda: SophiaH(ps(), dist='uniform'), "dist 'uniform' is not allowed; allowed: 'rademacher', 'gaussian'"),
    (lambda: SophiaH(ps(), n_probes=0), 'n_probes 0 must be an integer >= 1'),
])
def test_bad_settings(make, match):
    with pytest.raises(ValueError, match=match): make()


@pytest.mark.parametrize('cls', [AdaHessian, SophiaH])
def test_hessian_step_without_create_graph(cls):
    m = LeNet5()
    opt = cls(m.parameters())
    F.cross_entropy(m(torch.randn(4, 1, 32, 32)), torch.zeros(4, dtype=torch.long)).backward()
    with pytest.raises(RuntimeError, match=r'create_graph=True'): opt.step()


# ---------- gradient and Hessian-vector product in one pass ----------

class _Square(torch.autograd.Function):
    "x², with a backward and no forward-mode derivative"
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x
    @staticmethod
    def backward(ctx, g): return 2 * ctx.saved_tensors[0] * g


class _NoJvp(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
    def forward(self, x): return _Square.apply(self.lin(x))


@pytest.mark.parametrize('name', ['adahessian', 'sophiah'])
def test_one_pass_needs_forward_mode_derivatives(name):
    torch.manual_seed(0)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    m = _NoJvp()
    with pytest.raises(ValueError, match='without a forward-mode derivative .*fused=False'):
        train_step(m, make_optimizer(name, m, seed=0), x, y)
    r = train_step(m, make_optimizer(name, m, seed=0, fused=False), x, y)
    assert (r['n_hvp'], r['diverged']) == (1, False)


def test_one_pass_equals_two_on_a_block(batches):
    "AdaHessian over some parameters only (the classifier): the one pass differentiates in those alone"
    a, b = lenet64(), lenet64()
    for m, fused in ((a, True), (b, False)):
        run(m, AdaHessian(m.classifier.parameters(), seed=1, fused=fused), batches[:5])
    assert max_diff(a, lenet64()) > 0.01
    assert max_diff(a, b) <= 1e-12
    assert all(torch.equal(p, q) for p, q in zip(a.feature_extractor.parameters(), lenet64().feature_extractor.parameters()))
