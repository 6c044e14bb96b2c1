"""Shampoo against Distributed Shampoo (run from its source), and the slower checks against pytorch_optimizer.

Distributed Shampoo (facebookresearch/optimizers, `distributed_shampoo/`) is not on PyPI and is never committed here:
set DISTRIBUTED_SHAMPOO_SRC to the folder holding its `distributed_shampoo/` package (checked at f606606, 2026-08-05);
its tests skip without it, or where it does not import (its pyproject.toml asks for Python >= 3.12; the checked
commit imports and passes on 3.11)."""
import copy, importlib, logging, math, os, platform, sys
import pytest, torch, torch.nn.functional as F
import pytorch_optimizer
from pytorch_optimizer.optimizer.utils.graft import LayerWiseGrafting
from pytorch_optimizer.optimizer.utils.matrix import compute_power_schur_newton, power_iteration
from secondorder_cnn.data import get_dls
from secondorder_cnn.model import LeNet5, to_device
from secondorder_cnn.optimizers import Shampoo, make_optimizer, shampoo_precondition, train_step
from twins import digit_batches, lenet64, max_diff, run


@pytest.fixture(scope='module')
def batches(): return digit_batches()


# ---------- Distributed Shampoo, from its source ----------


def distributed_shampoo_modules():
    "`distributed_shampoo` and its `shampoo_types`, imported from DISTRIBUTED_SHAMPOO_SRC, or the test skips"
    src = os.environ.get('DISTRIBUTED_SHAMPOO_SRC')
    if not src or not os.path.isdir(os.path.join(src, 'distributed_shampoo')):
        pytest.skip('DISTRIBUTED_SHAMPOO_SRC is unset or holds no distributed_shampoo/ (facebookresearch/optimizers)')
    if src not in sys.path: sys.path.insert(0, src)
    logging.getLogger('distributed_shampoo').setLevel(logging.ERROR)
    try: return importlib.import_module('distributed_shampoo'), importlib.import_module('distributed_shampoo.shampoo_types')
    except (ImportError, SyntaxError) as e:
        pytest.skip(f'Distributed Shampoo does not import on Python {platform.python_version()}: {e}')


def distributed_shampoo(model, betas, f, t0, graft=None, beta3=-1., wd=0., wdt='decoupled', merge=False, momentum=None,
                        packed=False, eps=1e-10, lr=2**-10, dtype=torch.float64):
    "DistributedShampoo with float64 factors, its blocks as ours: out × in·k·k ('matrix') or its default merging"
    D, T = distributed_shampoo_modules()
    grafts = dict(adam=lambda b2: T.AdamPreconditionerConfig(beta2=b2, epsilon=1e-8),
                  rmsprop=lambda b2: T.RMSpropPreconditionerConfig(beta2=b2, epsilon=1e-8),
                  adagrad=lambda b2: T.AdaGradPreconditionerConfig(epsilon=1e-8),
                  sgd=lambda b2: T.SGDPreconditionerConfig())
    cfg = T.RootInvShampooPreconditionerConfig(factor_matrix_dtype=dtype, inv_factor_matrix_dtype=dtype,
                                               use_symmetric_packing=packed)
    return D.DistributedShampoo(
        model.parameters(), lr=lr, betas=betas, beta3=beta3, epsilon=eps, weight_decay=wd,
        weight_decay_type=T.WeightDecayType.DECOUPLED if wdt == 'decoupled' else T.WeightDecayType.L2,
        precondition_frequency=f, start_preconditioning_step=t0, preconditioner_config=cfg,
        iterate_averaging_config=None if momentum is None else T.ClassicMomentumConfig(**momentum),
        grafting_config=None if graft is None else grafts[graft](betas[1]),
        max_preconditioner_dim=1024 if merge else math.inf,
        distributed_config=T.SingleDeviceDistributedConfig(target_parameter_dimensionality=1 if merge else 2))

DS_CASES = {  # ours, Distributed Shampoo's; betas of 1/2 and lr 2^-10 keep its float32 scalars exact (see below)
    'adam': (dict(betas=(.5, .5), graft_beta2=.5), dict(betas=(.5, .5), graft='adam')),
    'adam merge': (dict(betas=(.5, .5), graft_beta2=.5, reshape='merge'),
                   dict(betas=(.5, .5), graft='adam', merge=True)),
    'adam nadam L2': (dict(betas=(.5, .5), beta3=.25, graft_beta2=.5, weight_decay=.1, weight_decay_type='L2'),
                      dict(betas=(.5, .5), beta3=.25, graft='adam', wd=.1, wdt='L2')),
    'rmsprop decoupled nesterov': (
        dict(betas=(.5, .5), graft='rmsprop', graft_beta2=.5, weight_decay=.1, momentum=.5, nesterov=True),
        dict(betas=(.5, .5), graft='rmsprop', wd=.1, momentum=dict(momentum=.5, dampening=0., use_nesterov=True))),
    'sgd dampened momentum': (dict(betas=(.5, .5), graft='sgd', momentum=.5, dampening=.5, lr=2**-4),
                              dict(betas=(.5, .5), graft='sgd', lr=2**-4,
                                   momentum=dict(momentum=.5, dampening=.5, use_nesterov=False))),
    'adagrad sums': (dict(betas=(0., 1.), graft='adagrad'), dict(betas=(0., 1.), graft='adagrad')),
    'no graft': (dict(betas=(.5, .5), graft=None, epsilon=1e-3, lr=2**-6), dict(betas=(.5, .5), eps=1e-3, lr=2**-6)),
}

def ds_twin(batches, case, f, t0):
    ours, peer = lenet64(), lenet64()
    kw, dkw = DS_CASES[case]
    run(peer, distributed_shampoo(peer, f=f, t0=t0, **dkw), batches)
    run(ours, Shampoo(ours.parameters(), **{'lr': 2**-10, 'epsilon': 1e-10, 'precondition_frequency': f,
                                            'start_preconditioning_step': t0, **kw}), batches)
    return ours, peer

@pytest.mark.parametrize('case', DS_CASES)
def test_equals_distributed_shampoo(batches, case):
    "Roots at step 7, then every 3rd: bit for bit, whatever the graft, filtering, weight decay and momentum"
    ours, peer = ds_twin(batches, case, 3, 7)
    assert max_diff(ours, lenet64()) > 1e-2
    assert max_diff(ours, peer) == 0


@pytest.mark.parametrize('case, f', [('adam', 1), ('adam', 5), ('adam merge', 5)])
def test_equals_distributed_shampoo_on_other_schedules(batches, case, f):
    ours, peer = ds_twin(batches, case, f, f)
    assert max_diff(ours, lenet64()) > 1e-2
    assert max_diff(ours, peer) == 0


def test_equals_distributed_shampoo_with_packed_factors(batches):
    "Its default keeps factors and roots as upper triangles: symmetrised, they differ from ours in the last bits"
    ours, peer = lenet64(), lenet64()
    run(peer, distributed_shampoo(peer, betas=(.5, .5), f=3, t0=7, graft='adam', packed=True), batches)
    run(ours, Shampoo(ours.parameters(), lr=2**-10, betas=(.5, .5), graft_beta2=.5, epsilon=1e-10,
                      precondition_frequency=3, start_preconditioning_step=7), batches)
    assert 0 < max_diff(ours, peer) <= 1e-10


def test_distributed_shampoo_rounds_its_scalars_to_float32(batches):
    "Its bias corrections and lr are float32 even in float64: 1 - 0.999 is 1.3e-5 off, 6.6e-6 under Adam's root"
    ours, peer = lenet64(), lenet64()
    run(peer, distributed_shampoo(peer, betas=(.9, .999), f=1, t0=1, graft='adam', eps=1e-12, lr=1e-3), batches[:1])
    run(ours, Shampoo(ours.parameters(), epsilon=1e-12, precondition_frequency=1), batches[:1])
    assert 1e-6 < max_diff(ours, peer) / max_diff(ours, lenet64()) < 1e-5


# ---------- pytorch_optimizer.Shampoo: sums, no graft, SVD roots at every step, one factor per dimension ----------

@pytest.mark.parametrize('eps, wd', [(1e-6, dict(weight_decay=.1, weight_decay_type='L2')), (1e-3, dict()),
                                     (1e-3, dict(weight_decay=.1))])  # the notebook runs the other three
def test_equals_pytorch_optimizer_shampoo(batches, eps, wd):
    "Its factors start at εI and are summed in another order, roots by SVD: the last bits differ"
    ours, peer = lenet64(), lenet64()
    run(ours, Shampoo(ours.parameters(), betas=(0., 1.), epsilon=eps, precondition_frequency=1, graft=None,
                      reshape='tensor', **wd), batches)
    pw = {} if not wd else dict(weight_decay=.1, weight_decouple=wd.get('weight_decay_type') != 'L2')
    run(peer, pytorch_optimizer.Shampoo(peer.parameters(), lr=1e-3, matrix_eps=eps, **pw), batches)
    assert max_diff(ours, lenet64()) > 1e-3
    assert max_diff(ours, peer) <= 1e-15


# ---------- pytorch_optimizer.ScalableShampoo: RMSprop graft, 1-D tensors to the graft, SVD roots ----------

B2 = 1 - 2**-40  # it starts its statistics at εI and decays that as β2^t ε: this close to 1, by 1e-11 of ε

def scalable_pair(model_a, model_b, f=10, lr=2**-30, graft='rmsprop', b1=0., eps=1e-15, **kw):
    "Ours and ScalableShampoo with its 'rmsprop' graft (its closest to Adam: no bias correction), SVD roots, raw shapes"
    ours = Shampoo(model_a.parameters(), lr=lr, betas=(0., B2), epsilon=eps, precondition_frequency=f, graft=graft,
                   graft_beta2=B2, graft_eps=1e-10, reshape='tensor', precondition_1d=False, use_bias_correction=False,
                   momentum=b1, nesterov=True, **kw)
    peer = pytorch_optimizer.ScalableShampoo(
        model_b.parameters(), lr=lr, betas=(b1, B2), start_preconditioning_step=f, preconditioning_compute_steps=f,
        graft_type=getattr(LayerWiseGrafting, graft.upper()), shape_interpretation=False, use_svd=True, matrix_eps=eps,
        diagonal_eps=1e-10, **({'weight_decay': kw['weight_decay'], 'decoupled_weight_decay': True} if kw else {}))
    return ours, peer

@pytest.mark.parametrize('kw', [dict(f=5), dict(f=1), dict(f=1, b1=.5), dict(f=10, graft='sgd', lr=1e-2),
                                dict(f=5, graft='sgd', lr=1e-2, weight_decay=.1)])
def test_equals_scalable_shampoo(batches, kw):
    "The factors' last bits, magnified by the roots of nearly singular factors (ε 1e-15): up to 5e-13 of the move"
    ours, peer = lenet64(), lenet64()
    oo, po = scalable_pair(ours, peer, **kw)
    run(ours, oo, batches)
    run(peer, po, batches)
    assert max_diff(ours, lenet64()) > 1e-3
    assert max_diff(ours, peer) <= 9e-14


def test_equals_scalable_shampoo_bit_for_bit_before_the_first_root(batches):
    ours, peer = lenet64(), lenet64()
    oo, po = scalable_pair(ours, peer, f=10)
    run(ours, oo, batches[:9])
    run(peer, po, batches[:9])
    assert max_diff(ours, lenet64()) > 1e-3
    assert max_diff(ours, peer) == 0


def test_scalable_shampoo_newton_roots_are_approximate(batches):
    "Its default coupled Newton iteration stops at ‖M − I‖∞ ≤ 1e-3: its roots are 1e-7..1e-4 off exact ones"
    peer = lenet64()
    torch.manual_seed(0)
    po = pytorch_optimizer.ScalableShampoo(peer.parameters(), betas=(0., .999), start_preconditioning_step=10,
                                           preconditioning_compute_steps=10, graft_type=LayerWiseGrafting.RMSPROP,
                                           shape_interpretation=False)
    run(peer, po, batches[:10])
    errs = []
    for p in peer.parameters():
        pc = po.state[p]['pre_conditioner']
        for S in pc.statistics:
            if len(S) == 1: continue
            r = pc.exponent_for_pre_conditioner
            torch.manual_seed(1)
            X = compute_power_schur_newton(S, r, ridge_epsilon=1e-6)
            torch.manual_seed(1)  # the same power-iteration draw, so the same ridge ε·λmax
            lam, Q = torch.linalg.eigh(S + power_iteration(S) * 1e-6 * torch.eye(len(S), dtype=S.dtype))
            E = Q * lam.pow(-1 / r) @ Q.T
            errs.append(((X - E).norm() / E.norm()).item())
    assert 1e-8 < min(errs) and max(errs) < 1e-3


# ---------- layouts, precision, the registry's settings ----------

def test_channels_last_matches_contiguous(batches):
    "The layout changes the gradients' rounding only (7e-15, as for Adam); ε = 1e-12 would amplify it to 2e-9"
    a = lenet64()
    c = to_device(copy.deepcopy(a), 'cpu')
    run(a, Shampoo(a.parameters(), epsilon=1e-8, precondition_frequency=4), batches[:10])
    run(c, Shampoo(c.parameters(), epsilon=1e-8, precondition_frequency=4), batches[:10])
    assert c.feature_extractor[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert max_diff(a, c) <= 1e-12


def test_registry_settings_in_float32_with_roots_from_step_10():
    trn, _ = get_dls('digits', bs=128, device='cpu')
    bs = [b for b, _ in zip(trn, range(20))]
    x, y = torch.cat([b[0] for b in bs]), torch.cat([b[1] for b in bs])
    torch.manual_seed(0)
    m = LeNet5()
    before = F.cross_entropy(m(x), y).item()
    opt = make_optimizer('shampoo', m, precondition_frequency=10, start_preconditioning_step=10)
    hist = [train_step(m, opt, xb, yb) for xb, yb in bs]
    assert not any(h['diverged'] for h in hist)
    assert F.cross_entropy(m(x), y).item() < before
    assert all(R.dtype == torch.float32 for p in m.parameters() for R in opt.state[p]['roots'])
    assert all(opt.state[p]['scale'] > 0 for p in m.parameters())


@pytest.mark.parametrize('n_steps', [3, 12])  # the graft alone (before step 5), then Shampoo
def test_precondition_with_momentum_and_weight_decay(batches, n_steps):
    "P⁻¹ excludes them: the step is −lr (M-update of P⁻¹m̂ + λW), rebuilt here from the state"
    m = lenet64()
    opt = Shampoo(m.parameters(), lr=2**-10, precondition_frequency=5, momentum=.5, weight_decay=.1)
    run(m, opt, batches[:n_steps - 1])
    before = [p.detach().clone() for p in m.parameters()]
    bufs = [opt.state[p]['momentum_buffer'].clone() for p in m.parameters()]
    run(m, opt, batches[n_steps - 1:n_steps])
    m_hat = [opt.state[p]['exp_avg'].reshape(p.shape) / (1 - .9**n_steps) for p in m.parameters()]
    for q, p, B, d in zip(before, m.parameters(), bufs, shampoo_precondition(opt, m_hat)):
        want = q - 2**-10 * (.5 * B.reshape(p.shape) + d + .1 * q)
        assert (p - want).abs().max() <= 1e-12 * (p - q).abs().max()


# ---------- bad input ----------

ps = lambda: LeNet5().parameters()

@pytest.mark.parametrize('make, match', [
    (lambda: Shampoo(ps(), lr=-1), 'lr -1 must be a finite number >= 0'),
    (lambda: Shampoo(ps(), betas=(0.9,)), r'betas \(0.9,\) must be a pair'),
    (lambda: Shampoo(ps(), betas=(1.0, 0.9)), r'betas\[0\] 1.0 must be in \[0, 1\)'),
    (lambda: Shampoo(ps(), betas=(0.9, 1.5)), r'betas\[1\] 1.5 must be in \[0, 1\]'),
    (lambda: Shampoo(ps(), beta3=1.0), r'beta3 1.0 must be in \[0, 1\)'),
    (lambda: Shampoo(ps(), epsilon=0), 'epsilon 0 must be a finite number > 0'),
    (lambda: Shampoo(ps(), weight_decay=-0.1), 'weight_decay -0.1 must be'),
    (lambda: Shampoo(ps(), weight_decay_type='AdamW'),
     "weight_decay_type 'AdamW' is not allowed; allowed: 'decoupled', 'L2'"),
    (lambda: Shampoo(ps(), precondition_frequency=0), 'precondition_frequency 0 must be an integer >= 1'),
    (lambda: Shampoo(ps(), precondition_frequency=10, start_preconditioning_step=5),
     'start_preconditioning_step 5 must be an integer >= 10'),
    (lambda: Shampoo(ps(), graft='lion'),
     "graft 'lion' is not allowed; allowed: 'adam', 'rmsprop', 'adagrad', 'sgd', None"),
    (lambda: Shampoo(ps(), graft_beta2=1.0), r'graft_beta2 1.0 must be in \(0, 1\)'),
    (lambda: Shampoo(ps(), graft_eps=-1e-8), 'graft_eps -1e-08 must be a finite number > 0'),
    (lambda: Shampoo(ps(), momentum=1), r'momentum 1 must be in \[0, 1\)'),
    (lambda: Shampoo(ps(), dampening=2), r'dampening 2 must be in \[0, 1\]'),
    (lambda: Shampoo(ps(), nesterov='yes'), "nesterov 'yes' must be True or False"),
    (lambda: Shampoo(ps(), reshape='flat'), "reshape 'flat' is not allowed; allowed: 'matrix', 'merge', 'tensor'"),
    (lambda: Shampoo(ps(), max_preconditioner_dim=0), 'max_preconditioner_dim 0 must be an integer >= 1'),
    (lambda: Shampoo(ps(), precondition_1d=1), 'precondition_1d 1 must be True or False'),
    (lambda: Shampoo(ps(), use_bias_correction=None), 'use_bias_correction None must be True or False'),
    (lambda: Shampoo([]), r'params \[\] must be tensors or parameter groups'),
    (lambda: make_optimizer('shampoo', ps(), graft='lion'), "graft 'lion' is not allowed"),
    (lambda: make_optimizer('shampoo', ps(), eps=1e-8), "shampoo has no setting 'eps'"),
])
def test_bad_settings(make, match):
    with pytest.raises(ValueError, match=match): make()
