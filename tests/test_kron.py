"PSGD-Kron against its references on more settings, and what differs in those that differ; seconds each"
import copy, io, math, random
import pytest, torch, torch.nn.functional as F
from torch import nn
import torch.nn.utils.parametrize as parametrize
import pytorch_optimizer
import pytorch_optimizer.optimizer.psgd as PO
from secondorder_cnn.data import get_dls
from secondorder_cnn.model import LeNet5, to_device
from secondorder_cnn.optimizers import (OPTIMIZERS, Kron, kron_precondition, kron_update_prob, make_optimizer,
                                        train_step, _kron_fit, _kron_init, _kron_p, _kron_roots, _norm_lower_bound)
from twins import least_squares


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='module')
def batches():
    "20 batches of 16 digits in float64"
    trn, _ = get_dls('digits', bs=16, device='cpu')
    return [(xb.double(), yb) for (xb, yb), _ in zip(trn, range(20))]


class Squeezed(nn.Module):
    "Holds conv1's (6, 1, 5, 5) filters as the (6, 5, 5) tensor Kron's factors see"
    def forward(self, w): return w.unsqueeze(1)
    def right_inverse(self, w): return w.squeeze(1)


def lenet64(seed=0, squeezed=False):
    torch.manual_seed(seed)
    m = LeNet5().double()
    if squeezed: parametrize.register_parametrization(m.feature_extractor[0], 'weight', Squeezed())
    return m


def params(m):
    "`m`'s tensors in LeNet5's order, conv1's filters as the tensor a parametrized model optimizes"
    c = m.feature_extractor[0]
    w = c.parametrizations.weight.original if parametrize.is_parametrized(c) else c.weight
    return [w] + [p for n, p in m.named_parameters() if n.startswith('feature_extractor.0.bias')
                  or not n.startswith('feature_extractor.0.')]


def max_diff(a, b):
    ws = lambda m: [m.feature_extractor[0].weight.detach()] + params(m)[1:]
    return max((p - q).abs().max().item() for p, q in zip(ws(a), ws(b)))


def run(model, opt, batches): return [train_step(model, opt, xb, yb) for xb, yb in batches]


def solve64(x, a):
    "pytorch_optimizer's and kron_torch's `X A⁻¹` in the tensors' dtype (they cast to float32)"
    return torch.linalg.solve_triangular(a, x.reshape(-1, x.size(-1)), upper=True, left=False).reshape_as(x)


def ours_run(batches, seed=3, **kw):
    m = lenet64()
    run(m, Kron(m.parameters(), **{'lr': 1e-3, 'damping': 0., 'balance_prob': 0., 'seed': seed, **kw}), batches)
    return m


# ---------- pytorch_optimizer 4.1 Kron: float64, 20 steps, the same draws ----------

def po_kron(ps, kw):
    opt = pytorch_optimizer.Kron(
        ps, lr=kw.get('lr', 1e-3), weight_decay=kw.get('weight_decay', 0.), momentum=kw.get('b1', 0.9),
        balance_prob=kw.get('balance_prob', 0.), precondition_dtype=torch.float64,
        momentum_into_precondition_update=kw.get('momentum_into_precond_update', True),
        max_size_triangular=kw.get('max_size_triangular', 8192), min_ndim_triangular=kw.get('min_ndim_triangular', 2))
    opt.param_groups[0].update(precondition_init_scale=kw.get('precond_init_scale', 1.),  # settings, not arguments
                               precondition_lr=kw.get('precond_lr', 0.1))
    return opt


CASES = [dict(), dict(weight_decay=0.1, b1=0.8), dict(momentum_into_precond_update=False), dict(balance_prob=1.),
         dict(max_size_triangular=10, precond_lr=0.3), dict(min_ndim_triangular=4), dict(precond_init_scale=30.)]


@pytest.mark.parametrize('kw', CASES)
def test_equals_pytorch_optimizer(batches, kw, monkeypatch):
    "Refit probability 1 and balancing 0 or 1 draw nothing: the only draws are the v's, in the same order"
    monkeypatch.setattr(PO, 'solve_triangular_right', solve64)
    ours = ours_run(batches, **kw)
    peer = lenet64(squeezed=True)
    torch.manual_seed(3)
    run(peer, po_kron(params(peer), kw), batches)
    assert max_diff(ours, lenet64()) > 1e-2
    assert max_diff(ours, peer) <= 1e-10


def test_the_clip_acts_in_the_last_case(batches):
    m = lenet64()
    opt = Kron(m.parameters(), lr=1e-3, damping=0., balance_prob=0., seed=3, precond_init_scale=30.)
    before = [p.detach().clone() for p in m.parameters()]
    run(m, opt, batches[:1])
    rms = [((p - q) / 1e-3).square().mean().sqrt().item() for p, q in zip(m.parameters(), before)]
    assert max(rms) == pytest.approx(1.1, rel=1e-5)


@pytest.mark.parametrize('case, lo, hi', [('float32 solve', 1e-10, 1e-8), ('size-1 factor', 1e-3, 2e-2),
                                          ('damping 1e-9', 1e-10, 1e-8)])
def test_what_each_difference_from_pytorch_optimizer_costs(batches, monkeypatch, case, lo, hi):
    """After 20 steps: its float32 triangular solve (measured 1.8e-9), the scalar factor it keeps and refits for conv1's
    size-1 dimension (8.1e-3), the author's damping 1e-9, our default, which it lacks (1.9e-9)"""
    if case != 'float32 solve': monkeypatch.setattr(PO, 'solve_triangular_right', solve64)
    ours = ours_run(batches, damping=1e-9 if case == 'damping 1e-9' else 0.)
    peer = lenet64(squeezed=case != 'size-1 factor')
    torch.manual_seed(3)
    run(peer, po_kron(params(peer), {}), batches)
    assert lo < max_diff(ours, peer) <= hi


# ---------- kron_torch 0.3.3: the same update, but for its damping ----------

@pytest.fixture
def kron_torch(monkeypatch):
    kt = pytest.importorskip('kron_torch')
    import kron_torch.kron as KT
    monkeypatch.setattr(KT, '_solve_triangular_right', solve64)
    with torch._dynamo.config.patch(disable=True): yield kt, KT  # it compiles its helpers; eager: the same arithmetic


def test_kron_torch_equals_ours_with_its_damping_undone(batches, kron_torch, monkeypatch, capsys):
    "It adds √ε₃₂·mean|h|·v to h in place (and preconditions the damped momentum): 2.1e-6 after 20 steps"
    kt, KT = kron_torch
    make = lambda ps: kt.Kron(ps, lr=1e-3, precond_dtype=torch.float64, merge_dims=False)
    ours = ours_run(batches)
    damped = lenet64(squeezed=True)
    torch.manual_seed(3)
    run(damped, make(params(damped)), batches)
    calc = KT._calc_A_and_conjB
    def undamped(exprA, G, Q):
        G0 = G.clone()
        _, conjB = calc(exprA, G, Q)
        G.copy_(G0)
        return torch.einsum(exprA, *Q, G), conjB
    monkeypatch.setattr(KT, '_calc_A_and_conjB', undamped)
    peer = lenet64(squeezed=True)
    torch.manual_seed(3)
    run(peer, make(params(peer)), batches)
    assert max_diff(ours, peer) <= 1e-10
    assert 1e-7 < max_diff(ours, damped) <= 1e-5
    r = random.Random(42)  # its own generator of balance decisions: it balances once, at step 20, which keeps P
    assert [i for i in range(20) if r.random() < 0.01] == [19]


def test_kron_torch_merges_filter_banks_by_default(kron_torch, capsys):
    "By default it folds a 4-D tensor into a matrix; the author's code and ours keep one factor per dimension"
    kt, _ = kron_torch
    m = LeNet5()
    opt = kt.Kron(m.parameters())
    F.cross_entropy(m(torch.randn(4, 1, 32, 32)), torch.zeros(4, dtype=torch.long)).backward()
    opt.step()
    assert [tuple(q.shape) for q in opt.state[m.feature_extractor[3].weight]['Q']] == [(480, 480), (5, 5)]


# ---------- heavyball 3.2 PSGDKron: the same update with another normaliser ----------

@pytest.mark.filterwarnings("ignore:It's recommended to use precond_init_scale=None")
def test_heavyball_differs_by_its_normaliser(batches, monkeypatch):
    """With our RMS clip, no running bound (lower_bound_beta=0), no damping, Q0 = I, refit probability 1: 6.3e-3 after
    20 steps (1.2e-7 after one); with our normaliser in place of its power iterations (`max_eigenvalue_spd`): 2.9e-9"""
    hb = pytest.importorskip('heavyball')
    import heavyball.utils as U
    monkeypatch.setattr(U, 'compile_mode', None)
    def rms_clip(xs):
        for u in xs: u.mul_(torch.clamp(1.1 / (u.square().mean().sqrt() + 1e-6), max=1.))
        return xs
    def peer_run():
        m = lenet64()
        torch.manual_seed(3)
        opt = hb.PSGDKron(m.parameters(), lr=1e-3, betas=(0.9, 0.999), preconditioner_update_probability=1.,
                          precond_init_scale=1., lower_bound_beta=0., dampening=0., q_dtype='float64',
                          storage_dtype='float64', compile_step=False, multi_tensor=False, store_triu_as_line=False,
                          update_clipping=rms_clip, max_size_triangular=8192)
        run(m, opt, batches)
        return m
    ours, theirs = ours_run(batches), peer_run()
    monkeypatch.setattr(U, 'max_eigenvalue_spd', lambda A, power_iter=0: A.max() if A.ndim < 2 else torch.stack(
        [_norm_lower_bound(a) for a in A.reshape(-1, *A.shape[-2:])]).view(A.shape[:-2]))
    ours_normaliser = peer_run()
    assert max_diff(ours, theirs) > 1e-3 and max_diff(ours, ours_normaliser) < 1e-8


# ---------- the author's factor update (psgd_torch 0.6.1, his 2024 `Kron`) ----------

@pytest.mark.parametrize('kind', ['triangular', 'diagonal'])
@pytest.mark.parametrize('shape', [(84, 120), (6, 5, 5), (120, 16, 5, 5), (10,)])
def test_factor_update_equals_the_authors(shape, kind):
    "5 fits on the same (v, h) pairs give the same P (his balancing, drawn from torch's generator, keeps P)"
    LI = pytest.importorskip('psgd_torch.psgd')
    torch.manual_seed(0)
    hs = [0.01 * torch.randn(shape, dtype=torch.float64) for _ in range(5)]
    vs = [torch.randn(shape, dtype=torch.float64) for _ in range(5)]
    tri = kind == 'triangular'  # his code makes a vector's factor triangular too, unless told otherwise
    q, exprs = LI.init_Q_exprs(hs[0], 1., float('inf') if tri else 0, float('inf'))
    ours = _kron_init(shape, 1., 8192 if tri else 0, 1, torch.float64, 'cpu')
    assert [x.shape for x in q] == [x.shape for x in ours]
    for h, v in zip(hs, vs):
        LI.update_precond_kron_math_(q, exprs, v, h, 0.1, '2nd', 0.)
        _kron_fit(ours, h, v, 0.1, 0.)
    g = torch.randn(shape, dtype=torch.float64)
    pg = LI.precond_grad_kron_math(q, exprs, g)
    assert (pg - _kron_p(_kron_roots(ours), g)).abs().max() <= 1e-12 * pg.abs().max()


# ---------- the schedule, the generator ----------

@pytest.mark.parametrize('n', [0, 250, 499, 500, 501, 1000, 2000, 4000, 10_000])
def test_update_prob_schedule_equals_kron(n):
    assert kron_update_prob(n) == pytest.approx(PO.precondition_update_prob_schedule()(n).item(), rel=1e-6)


def test_refits_become_rarer_on_the_schedule():
    "flat_start 0, decay ln 2: chances 1, 1/2, 1/4, ... down to min_prob 0.03"
    torch.manual_seed(0)
    m = LeNet5()
    x, y = torch.randn(8, 1, 32, 32), torch.randint(0, 10, (8,))
    opt = Kron(m.parameters(), flat_start=0, prob_decay=math.log(2), seed=1)
    w, refits = m.classifier[2].weight, []
    for _ in range(200):
        q = opt.state[w]['Q'][0].clone() if w in opt.state else None
        train_step(m, opt, x, y)
        refits.append(q is None or not torch.equal(q, opt.state[w]['Q'][0]))
    assert sum(refits[10:]) < 20 and all(refits[:1])


def test_make_optimizer_seeds_it():
    ps = list(LeNet5().parameters())
    assert OPTIMIZERS['kron'].seeded and make_optimizer('kron', ps, seed=3).gen.initial_seed() == 3
    g = torch.Generator().manual_seed(5)
    assert Kron(ps, generator=g).gen is g


# ---------- the registry's settings ----------

@pytest.mark.parametrize('damping, converges', [(None, True), (1e-9, False)])
def test_convex_quadratic(damping, converges):
    """tests/test_optimizers.py's quadratic: whitening makes steps of RMS ~lr whatever the gradient, and only the
    damping's bound P <= I/δ lets them shrink. The registry's δ = 5e-4 converges (to 3e-33); 1e-9 stalls at 1.6e-6"""
    kw = {} if damping is None else dict(damping=damping)
    losses, err, _ = least_squares(lambda m: make_optimizer('kron', m, seed=0, **kw))
    if converges: assert min(losses) < 1e-8 * losses[0] and err < 1e-3
    else: assert min(losses) > 1e-7 * losses[0]


def test_float32_channels_last_matches_contiguous():
    x, y = torch.randn(32, 1, 32, 32), torch.randint(0, 10, (32,))
    torch.manual_seed(0)
    a = LeNet5()
    c = to_device(copy.deepcopy(a), 'cpu')
    oa, oc = make_optimizer('kron', a, seed=0), make_optimizer('kron', c, seed=0)
    for _ in range(5): train_step(a, oa, x, y); train_step(c, oc, x, y)
    assert c.feature_extractor[3].weight.is_contiguous(memory_format=torch.channels_last)
    assert all(q.dtype == torch.float32 for q in oa.state[a.feature_extractor[3].weight]['Q'])
    assert max((p - q).abs().max().item() for p, q in zip(a.parameters(), c.parameters())) < 1e-5


def test_precondition_in_float32_after_the_registrys_steps():
    "P^{-1/2} applied twice is P^{-1}, in float32 too, after refits at every step"
    trn, _ = get_dls('digits', bs=64, device='cpu')
    torch.manual_seed(0)
    m = LeNet5()
    opt = make_optimizer('kron', m, seed=0)
    for (xb, yb), _ in zip(trn, range(5)): train_step(m, opt, xb, yb)
    vs = [torch.randn_like(p) for p in m.parameters()]
    once, twice = kron_precondition(opt, vs), kron_precondition(opt, kron_precondition(opt, vs, 0.5), 0.5)
    assert all((a - b).abs().max() <= 1e-4 * a.abs().max() for a, b in zip(once, twice))
