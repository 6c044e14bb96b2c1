"""K-FAC: the factors of unusual layers against curvlinops, the KL clip's closed form, kfac-pytorch's scale against the
dense step, float32 training, the convex quadratic, and the optimizer against kfac-pytorch from its source"""
import math, os, sys, types, warnings
import pytest, torch, torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from curvlinops import KFACLinearOperator
from secondorder_cnn.data import get_dls
from secondorder_cnn.hessian import HessianOperator
from secondorder_cnn.model import LeNet5
from secondorder_cnn.optimizers import (FISHER_TYPES, KFAC, KFAC_APPROX, input_factor, kfac_factors, kfac_layers,
                                        kfac_precondition, train_step)
from twins import digit_batches, least_squares, lenet64, max_diff, run

torch.set_num_threads(1)


@pytest.fixture(scope='module')
def batches(): return digit_batches()


def curvlinops_factors(model, x, y, kfac_approx='expand', fisher_type='empirical'):
    "curvlinops' (A, G) by layer name, the bias as a last column of ones in A"
    ps = [p for m in kfac_layers(model).values() for p in m.parameters()]
    op = KFACLinearOperator(model, nn.CrossEntropyLoss(), ps, [(x, y)], fisher_type=fisher_type,
                            kfac_approx=kfac_approx, separate_weight_and_bias=False, check_deterministic=False)
    op.compute_kronecker_factors()
    sd = op.state_dict()
    return {k: (sd['input_covariances'][k], sd['gradient_covariances'][k]) for k in sd['gradient_covariances']}


# ---------- the factors of unusual layers ----------

class Odd(nn.Module):
    "Convolutions with stride, padding ('same' too), dilation, no bias; a Linear on 3-d features"
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 3, 3, stride=2, padding=2, dilation=2)
        self.c2 = nn.Conv2d(3, 4, (3, 5), padding='same', bias=False)
        self.l1, self.l2 = nn.Linear(5, 6), nn.Linear(120, 10)
    def forward(self, x):  # (N, 1, 9, 9) → (N, 3, 5, 5) → (N, 4, 5, 5) → (N, 4, 5, 6): l1 shared over 4×5 positions
        return self.l2(torch.relu(self.l1(self.c2(torch.relu(self.c1(x))))).flatten(1))


@pytest.mark.parametrize('fisher_type', FISHER_TYPES)
@pytest.mark.parametrize('kfac_approx', KFAC_APPROX)
def test_odd_layers_factors_equal_curvlinops(kfac_approx, fisher_type):
    torch.manual_seed(1)
    net, x, y = Odd().double(), torch.randn(8, 1, 9, 9, dtype=torch.float64), torch.randint(0, 10, (8,))
    ref = curvlinops_factors(net, x, y, kfac_approx, fisher_type)
    ours = kfac_factors(net, x, y, kfac_approx, fisher_type, torch.Generator().manual_seed(2147483647))
    assert sorted(ours) == sorted(ref)
    for k, (A, G) in ours.items():
        assert A.shape == ref[k][0].shape and G.shape == ref[k][1].shape
        assert (A - ref[k][0]).abs().max() <= 1e-10 * ref[k][0].abs().max()
        assert (G - ref[k][1]).abs().max() <= 1e-10 * ref[k][1].abs().max() and G.abs().max() > 0


@pytest.mark.parametrize('conv, pad', [
    (nn.Conv2d(2, 3, (3, 2), padding='same'), ((0, 1, 1, 1), 'constant')),  # an even side: one more on the right
    (nn.Conv2d(2, 3, 3, padding=1, padding_mode='reflect'), ((1, 1, 1, 1), 'reflect')),
    (nn.Conv2d(2, 3, 2, stride=(2, 1), padding=(0, 1), dilation=(1, 2), padding_mode='circular'),
     ((1, 1, 0, 0), 'circular'))])
def test_patches_of_any_padding(conv, pad):
    "A of the layer's own padding: the input padded by `F.pad`, then unfolded without padding"
    x = torch.randn(2, 2, 7, 6, dtype=torch.float64)
    conv = conv.double()
    a = F.unfold(F.pad(x, *pad), conv.kernel_size, conv.dilation, 0, conv.stride)
    assert a.shape[2] == conv(x)[0, 0].numel()
    a = torch.cat([a, torch.ones_like(a[:, :1])], 1).transpose(0, 1).flatten(1)
    assert torch.allclose(input_factor(conv, x), a @ a.T / a.shape[1], atol=1e-12)


def test_conv_with_groups_is_refused():
    with pytest.raises(ValueError, match=r"layer '1' is a Conv2d with groups=2: K-FAC's factors take groups=1 only"):
        KFAC(nn.Sequential(nn.Conv2d(2, 2, 1), nn.Conv2d(2, 4, 3, groups=2)))


# ---------- the KL clip ----------

def tiny64(bn=False):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2) if bn else nn.Identity(), nn.ReLU(), nn.Flatten(),
                         nn.Linear(32, 3)).double()


def tiny_batches(n=6, bs=8):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(bs, 1, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (bs,), generator=g))
            for _ in range(n)]


def layer_P(opt, m):
    "The dense $A \\otimes G + \\lambda I$ of layer `m` from the optimizer's eigenbases, for row-major vec"
    st = opt.state[m.weight]
    Q = torch.kron(st['QG'], st['QA'])
    return Q @ torch.diag(1 / st['dgda'].flatten()) @ Q.T


@pytest.mark.parametrize('kl_clip', [1e-5, 1e3, None])
def test_kl_clip_bounds_the_step_in_the_preconditioner_norm(kl_clip):
    "A clipped step Δ has $\\Delta^T P \\Delta = \\kappa$ over the layers; unclipped, Δ is $-\\eta P^{-1} \\nabla$"
    m = tiny64()
    opt = KFAC(m, lr=0.5, momentum=0., weight_decay=0., kl_clip=kl_clip)
    x, y = tiny_batches(1)[0]
    before = [p.detach().clone() for p in m.parameters()]
    train_step(m, opt, x, y)
    dp = {p: p.detach() - b for p, b in zip(m.parameters(), before)}
    vec = lambda mod, t: torch.cat([t[mod.weight].flatten(1), t[mod.bias][:, None]], 1).flatten()
    dPd = sum(vec(mod, dp) @ layer_P(opt, mod) @ vec(mod, dp) for mod in opt.layers)
    grads = {p: p.grad for p in m.parameters()}
    gPg = sum(vec(mod, grads) @ torch.linalg.solve(layer_P(opt, mod), vec(mod, grads)) for mod in opt.layers)
    nu = opt.param_groups[0]['kl_scale']
    if kl_clip == 1e-5:
        assert nu < 1 and dPd.item() == pytest.approx(kl_clip, rel=1e-10)
        assert nu == pytest.approx(math.sqrt(kl_clip / (0.5**2 * gPg.item())), rel=1e-10)
    else: assert nu == 1 and dPd.item() == pytest.approx(0.5**2 * gPg.item(), rel=1e-10)


def test_lr_has_no_effect_while_the_clip_acts(batches):
    "ην = √(κ / ∇ᵀP⁻¹∇) whatever η: without weight decay, lr 0.1 and 0.4 take the same steps when every step is clipped"
    ms = []
    for lr in (0.1, 0.4):
        m = lenet64()
        opt = KFAC(m, lr=lr, kl_clip=1e-6, weight_decay=0.)
        for xb, yb in batches[:6]:
            train_step(m, opt, xb, yb)
            assert opt.param_groups[0]['kl_scale'] < 1
        ms.append(m)
    assert max_diff(ms[0], lenet64()) > 1e-3
    assert max_diff(*ms) <= 1e-12


# ---------- kfac-pytorch's scale and momentum against the dense step ----------

def test_kfac_pytorch_scale_equals_the_dense_step():
    "Its factors are curvlinops' with a Conv2d's A over T² and every G over N²T³ (T = 1 for a Linear)"
    kw = dict(lr=0.1, momentum=0.9, weight_decay=1e-3, damping=1e-4, factor_decay=0.5, kl_clip=1e-3,
              factor_update_steps=1, inv_update_steps=2)
    ours, ref = tiny64(), tiny64()
    opt = KFAC(ours, **kw, scale='kfac-pytorch')
    layers, ps, avg, bufs = kfac_layers(ref), list(ref.parameters()), {}, {}
    for t, (x, y) in enumerate(tiny_batches()):
        train_step(ours, opt, x, y)
        grad = dict(zip(ps, torch.autograd.grad(F.cross_entropy(ref(x), y), ps)))
        for k, (A, G) in curvlinops_factors(ref, x, y).items():
            T = 16 if isinstance(layers[k], nn.Conv2d) else 1  # the conv's 4×4 outputs
            A, G = A / T**2, G / (len(x)**2 * T**3)
            A0, G0 = avg.get(k, (torch.eye(len(A), dtype=A.dtype), torch.eye(len(G), dtype=G.dtype)))
            avg[k] = (0.5 * A0 + 0.5 * A, 0.5 * G0 + 0.5 * G)
        if t % 2 == 0: P = {k: torch.kron(G, A) + 1e-4 * torch.eye(len(A) * len(G), dtype=A.dtype)
                            for k, (A, G) in avg.items()}
        d, vg = {}, 0.
        for k, m in layers.items():
            V = torch.cat([grad[m.weight].flatten(1), grad[m.bias][:, None]], 1)
            v = torch.linalg.solve(P[k], V.flatten()).view_as(V)
            vg += 0.1**2 * (v * V).sum().item()
            d[m.weight], d[m.bias] = v[:, :-1].reshape(m.weight.shape), v[:, -1]
        nu = min(1., math.sqrt(1e-3 / vg))
        assert opt.param_groups[0]['kl_scale'] == pytest.approx(nu, rel=1e-10)
        with torch.no_grad():
            for p in ps:
                u = d[p] * nu + 1e-3 * p
                bufs[p] = 0.9 * bufs[p] + u if p in bufs else u
                p -= 0.1 * bufs[p]
    assert max_diff(ours, tiny64()) > 1e-2
    assert max_diff(ours, ref) <= 1e-10


def test_precondition_with_momentum_and_weight_decay():
    "The buffer grows by $\\nu P^{-1} \\nabla$ plus the weight decay; BatchNorm's parameters by their gradient"
    m = tiny64(bn=True)
    opt = KFAC(m, lr=0.1, momentum=0.9, weight_decay=1e-3, damping=0.01, factor_decay=0.5, kl_clip=1e-4,
               factor_update_steps=1, inv_update_steps=2)
    for x, y in tiny_batches(4):
        old = [opt.state[p]['momentum_buffer'].clone() for p in m.parameters()] if opt.state else None
        w = [p.detach().clone() for p in m.parameters()]
        train_step(m, opt, x, y)
    ps = list(m.parameters())
    dirs = kfac_precondition(opt, [p.grad for p in ps])
    assert opt.param_groups[0]['kl_scale'] < 1
    for p, b, d, w0 in zip(ps, old, dirs, w):
        assert (opt.state[p]['momentum_buffer'] - 0.9 * b - (d + 1e-3 * w0)).abs().max() <= 1e-12
    with pytest.raises(ValueError, match='power nan must be a finite number'): kfac_precondition(opt, dirs, math.nan)
    with pytest.raises(ValueError, match='must be a KFAC optimizer'):
        kfac_precondition(torch.optim.SGD(m.parameters()), dirs)


def test_preconditioned_sharpness_is_that_of_the_dense_P_inverse_H():
    "Lanczos on $P^{-1/2} H P^{-1/2}$ through `kfac_precondition(..., 0.5)`: the top eigenvalue of the dense $P^{-1}H$"
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(32, 3)).double()
    x, y = tiny_batches(1, bs=16)[0]
    opt = KFAC(m, damping=0.01, factor_decay=0.5, inv_update_steps=2)
    for _ in range(5): train_step(m, opt, x, y)
    assert opt.param_groups[0]['kl_scale'] < 1
    ps, names = list(m.parameters()), [k for k, _ in m.named_parameters()]
    unflat = lambda v: [t.view_as(p) for t, p in zip(torch.split(v, [p.numel() for p in ps]), ps)]
    eye = torch.eye(sum(p.numel() for p in ps), dtype=torch.float64)
    P_inv = torch.stack([torch.cat([t.flatten() for t in kfac_precondition(opt, unflat(e))]) for e in eye], 1)
    assert (P_inv - P_inv.T).abs().max() <= 1e-12 and torch.linalg.eigvalsh(P_inv).min() > 0
    loss = lambda w: F.cross_entropy(functional_call(m, dict(zip(names, unflat(w))), (x,)), y)
    H = torch.autograd.functional.hessian(loss, torch.cat([p.detach().flatten() for p in ps]))
    dense = torch.linalg.eigvals(P_inv @ H).real.max().item()
    op = HessianOperator(m, F.cross_entropy, data=(x, y)).preconditioned(lambda vs: kfac_precondition(opt, vs, 0.5))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        assert op.eigenvalues(1, max_iter=100)[0][0] == pytest.approx(dense, rel=1e-8)


# ---------- training ----------

def test_float32_lenet5_learns_with_either_approximation():
    "20 steps on batches of 128 digits: the averages still lean on their start at I, so progress is slow"
    trn, _ = get_dls('digits', bs=128, device='cpu')
    bs = [b for _ in range(2) for b in trn][:20]
    x, y = torch.cat([b[0] for b in bs[:12]]), torch.cat([b[1] for b in bs[:12]])
    for approx in KFAC_APPROX:
        torch.manual_seed(0)
        m = LeNet5()
        before = F.cross_entropy(m(x), y).item()
        opt = KFAC(m, kfac_approx=approx)
        assert not any(h['diverged'] for h in run(m, opt, bs))
        assert opt.state[m.feature_extractor[3].weight]['QA'].dtype == torch.float32
        assert F.cross_entropy(m(x), y).item() < 0.95 * before


def quadratic(**kw):
    "tests/test_optimizers.py's least squares: the losses of 1,000 K-FAC steps, |w - w*|, λ1(H)"
    return least_squares(lambda m: KFAC(m, **kw))


def test_the_empirical_fisher_needs_damping_above_sgds_limit_on_a_quadratic():
    """At an exact fit the empirical Fisher vanishes, G = mean residual² → 0, so P → λI and the step → (η/λ)∇:
    stable only while η λ₁(H)/λ < 2 + 2μ, i.e. λ > 0.045 here. At λ = 0.003 the loss cycles, the KL clip catching each
    blow-up"""
    losses, err, lam1 = quadratic()
    assert 0.1 * lam1 / 3.8 == pytest.approx(0.045, abs=1e-3)
    assert min(losses) > 1e-8 * losses[0] and max(losses[500:]) > 0.1 * losses[0] and err > 1e-2
    losses, err, _ = quadratic(damping=0.1)
    assert min(losses) < 1e-8 * losses[0] and err < 1e-4


# ---------- identity with kfac-pytorch, from its source ----------

def import_kfac_pytorch():
    "kfac-pytorch's `kfac` package from the folder $KFAC_PYTORCH_SRC (its source is not on PyPI)"
    src = os.environ.get('KFAC_PYTORCH_SRC')
    if not src or not os.path.isdir(os.path.join(src, 'kfac')):
        pytest.skip('kfac-pytorch is not on PyPI: set KFAC_PYTORCH_SRC to a folder holding its kfac package')
    sys.path.insert(0, src)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            import kfac.preconditioner, kfac.layers.eigen
        return kfac
    finally: sys.path.remove(src)


@pytest.mark.parametrize('lift', [True, False])
@pytest.mark.parametrize('fu, iu', [(1, 10), (3, 5)])
def test_equals_kfac_pytorch(batches, monkeypatch, fu, iu, lift):
    """kfac-pytorch's KFACPreconditioner before torch.optim.SGD, on its own factor scale. It eigendecomposes in
    float32 whatever the factors' dtype (kfac/layers/eigen.py, compute_a_inv): 1e-10 with that cast lifted, else 1e-6"""
    kp = import_kfac_pytorch()
    if lift:
        class Torch64(types.ModuleType):
            def __getattr__(self, k): return torch.float64 if k == 'float32' else getattr(torch, k)
        monkeypatch.setattr(kp.layers.eigen, 'torch', Torch64('torch'))
    kw = dict(lr=0.1, momentum=0.9, weight_decay=5e-4, damping=0.003, factor_decay=0.95, kl_clip=0.001)
    ours, peer = lenet64(), lenet64()
    opt = KFAC(ours, **kw, factor_update_steps=fu, inv_update_steps=iu, scale='kfac-pytorch')
    sgd = torch.optim.SGD(peer.parameters(), lr=kw['lr'], momentum=kw['momentum'], weight_decay=kw['weight_decay'])
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        pre = kp.preconditioner.KFACPreconditioner(
            peer, factor_update_steps=fu, inv_update_steps=iu, damping=kw['damping'], factor_decay=kw['factor_decay'],
            kl_clip=kw['kl_clip'], lr=lambda _: sgd.param_groups[0]['lr'], inv_dtype=torch.float64)
        for xb, yb in batches:
            train_step(ours, opt, xb, yb)
            sgd.zero_grad()
            F.cross_entropy(peer(xb), yb).backward()
            pre.step()
            sgd.step()
    assert max_diff(ours, lenet64()) > 0.1
    assert max_diff(ours, peer) <= (1e-10 if lift else 1e-6)
