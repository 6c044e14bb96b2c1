"""Hessian quantities: this project's HessianOperator vs PyHessian 0.1, side by side in one run.

    python benchmarks/hessian.py [--seeds 3] [--quick] [--lenet-only]

1. LeNet5 trained 2 epochs with Adam on Fashion-MNIST, Hessian on a fixed stratified 2,000-sample batch (float32):
   HVP time / gradient time; HVPs, seconds and accuracy of top-1 and top-5 (reference: Lanczos to 1e-9);
   trace by Hutch++, Hutchinson and PyHessian's rule (reference: all unbiased estimates pooled).
2. A small CNN (float64) whose dense Hessian is the reference: the same, and the trace's error percentiles
   over 40 seeds.
"""
import argparse, math, sys, time
import numpy as np, torch, torch.nn.functional as F
from torch import nn
import pyhessian
from secondorder_cnn.data import load_tensors, stratified_subset, get_dls
from secondorder_cnn.hessian import HessianOperator
from secondorder_cnn.model import LeNet5, fit, to_device

pyh_mod = sys.modules['pyhessian.hessian']
_pyh_hvp, n_pyh = pyh_mod.hessian_vector_product, [0]
def counting_hvp(*a, **k):
    n_pyh[0] += 1
    return _pyh_hvp(*a, **k)
pyh_mod.hessian_vector_product = counting_hvp


def flat(vs): return torch.cat([v.reshape(-1) for v in vs]).double()


def timed(f):
    t0 = time.perf_counter(); r = f(); return r, time.perf_counter() - t0


def accuracy(eigs, vecs, ref_eigs, ref_vecs):
    "Worst relative eigenvalue error and worst |cos| with the reference eigenvectors"
    err = max(abs(e - r) / abs(r) for e, r in zip(eigs, ref_eigs))
    cos = min(abs(torch.dot(flat(v) / flat(v).norm(), u).item()) for v, u in zip(vecs, ref_vecs))
    return err, cos


def eig_table(model, x, y, ref_eigs, ref_vecs, tols=(1e-3, 1e-4, 1e-5, 1e-6)):
    rows = []
    for k in (1, 5):
        for tol in (1e-4, 1e-5):
            H = HessianOperator(model, F.cross_entropy, data=(x, y))
            r, s = timed(lambda: H.eigenvalues(top_n=k, tol=tol))
            name = f"this project, Lanczos, tol {tol:g}{' (default)' if tol == 1e-5 else ''}"
            rows.append((f'top-{k}', name, r.n_hvp, s, *accuracy(r[0], r[1], ref_eigs[:k], ref_vecs[:k])))
        for tol in tols:
            torch.manual_seed(0)
            ph = pyhessian.hessian(model, F.cross_entropy, data=(x, y), cuda=False)
            n_pyh[0] = 0
            (e, v), s = timed(lambda: ph.eigenvalues(top_n=k, tol=tol))
            rows.append((f'top-{k}', f'PyHessian power iteration, tol {tol:g}', n_pyh[0], s, *accuracy(e, v, ref_eigs[:k], ref_vecs[:k])))
            model.zero_grad(set_to_none=True)
    print('| eigenpairs | method | HVPs | seconds | max rel. error of λ | min \\|cos\\| with true v |')
    print('|---|---|---:|---:|---:|---:|')
    for w, m, n, s, err, cos in rows: print(f'| {w} | {m} | {n} | {s:.1f} | {err:.1e} | {cos:.4f} |')


def trace_runs(model, x, y, seeds, budgets):
    "Trace estimates: {method: [(estimate, stderr, n_hvp)]}"
    out = {}
    for b in budgets:
        H = HessianOperator(model, F.cross_entropy, data=(x, y))
        for m in ('hutch++', 'hutchinson'):
            out[f'{m}, {b} HVPs'] = [(*(r := H.trace(method=m, max_hvp=b, seed=s)), r.n_hvp) for s in seeds]
    runs = []
    for s in seeds:
        torch.manual_seed(s)
        ph = pyhessian.hessian(model, F.cross_entropy, data=(x, y), cuda=False)
        n_pyh[0] = 0
        samples = ph.trace()
        runs.append((float(np.mean(samples)), float(np.std(samples, ddof=1) / math.sqrt(len(samples))) if len(samples) > 1 else math.inf, n_pyh[0]))
        model.zero_grad(set_to_none=True)
    out["PyHessian's rule (tol 1e-3)"] = runs
    return out


def trace_table(runs, truth, truth_note):
    print(f'\nreference trace {truth:.6g} ({truth_note})\n')
    print('| trace method | mean HVPs | median rel. error | 95th pct rel. error | 1.96 × stderr / trace (mean) |')
    print('|---|---:|---:|---:|---:|')
    for k, rs in runs.items():
        errs = np.array([abs(e - truth) / abs(truth) for e, _, _ in rs])
        se = np.mean([1.96 * s / abs(truth) for _, s, _ in rs])
        print(f'| {k} | {np.mean([n for *_, n in rs]):.0f} | {np.median(errs):.2%} | {np.percentile(errs, 95):.2%} | {se:.2%} |')


def lenet_part(seeds, quick):
    torch.manual_seed(0)
    trn, tst = get_dls('fashion_mnist', bs=1000, device='cpu')
    model = to_device(LeNet5(), 'cpu')
    fit(model, torch.optim.Adam(model.parameters()), trn, tst, 1 if quick else 2)
    x, y = load_tensors('fashion_mnist')
    i = stratified_subset(y, 500 if quick else 2000, seed=0)
    x, y = x[i], y[i]
    model.eval()
    ps = list(model.parameters())
    H = HessianOperator(model, F.cross_entropy, data=(x, y))
    v = torch.randn(H.n)
    torch.manual_seed(0)
    ph = pyhessian.hessian(model, F.cross_entropy, data=(x, y), cuda=False)
    vs = H._unflat(v)
    ops = [lambda: torch.autograd.grad(F.cross_entropy(model(x), y), ps), lambda: H._mv(v), lambda: _pyh_hvp(ph.gradsH, ph.params, vs)]
    for op in ops: op()  # warm-up
    best = [math.inf] * len(ops)
    for _ in range(7): best = [min(b, timed(op)[1]) for b, op in zip(best, ops)]  # interleaved, best of 7
    t_grad, t_hvp, t_ph = best
    model.zero_grad(set_to_none=True)
    print(f'## LeNet5 ({H.n:,} parameters), Fashion-MNIST, {len(y):,}-sample batch, float32, {torch.get_num_threads()} CPU threads, torch {torch.__version__}\n')
    print('| operation | seconds | / gradient |\n|---|---:|---:|')
    for k, t in (('gradient', t_grad), ('HVP, this project (cached graph, double backward)', t_hvp), ('HVP, PyHessian', t_ph)):
        print(f'| {k} | {t:.3f} | {t / t_grad:.2f}× |')
    ref = HessianOperator(model, F.cross_entropy, data=(x, y)).eigenvalues(top_n=5, tol=1e-9, max_iter=300, seed=1234)
    print(f'\nreference top-5 (Lanczos from another start, tol 1e-9, {ref.n_hvp} HVPs): {[round(e, 5) for e in ref[0]]}\n')
    eig_table(model, x, y, ref[0], [flat(u) for u in ref[1]], (1e-3, 1e-4) if quick else (1e-3, 1e-4, 1e-5, 1e-6))
    runs = trace_runs(model, x, y, seeds, (100, 300))
    pooled = [(e, s) for k, rs in runs.items() if 'PyHessian' not in k for e, s, _ in rs]
    w = np.array([1 / s**2 for _, s in pooled])
    truth = float(np.sum(w * np.array([e for e, _ in pooled])) / w.sum())
    trace_table(runs, truth, f'inverse-variance mean of the {len(pooled)} Hutch++/Hutchinson estimates, stderr {1 / math.sqrt(w.sum()):.3g}')


def small_part(quick):
    x, y = load_tensors('fashion_mnist')
    i = stratified_subset(y, 500, seed=1)
    x, y = F.avg_pool2d(x[i], 2).double(), y[i]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 8, 3), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 10)).double()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        loss = F.cross_entropy(model(x), y); opt.zero_grad(); loss.backward(); opt.step()
    model.eval()
    Hd = HessianOperator(model, F.cross_entropy, data=(x, y)).dense()
    lam, U = torch.linalg.eigh(Hd)
    print(f'\n## Small CNN ({len(lam):,} parameters), 500 Fashion-MNIST images at 16×16, float64, trained 300 Adam steps; dense reference\n')
    print(f'true top-5: {[round(e, 5) for e in lam.flip(0)[:5].tolist()]}; most negative {lam[0].item():.5f}\n')
    eig_table(model, x, y, lam.flip(0).tolist(), [U[:, -1 - j] for j in range(5)])
    seeds = range(10 if quick else 40)
    trace_table(trace_runs(model, x, y, seeds, (30, 100, 300)), torch.trace(Hd).item(), 'dense')


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--seeds', type=int, default=3, help='trace runs per method on LeNet5')
    p.add_argument('--quick', action='store_true', help='smaller batch and fewer runs, to check the script')
    p.add_argument('--lenet-only', action='store_true', help='only the LeNet5 part')
    a = p.parse_args()
    if not a.lenet_only: small_part(a.quick); print()
    lenet_part(range(a.seeds), a.quick)
