"""The 25 × 25 loss surface of one trained LeNet5 on 2,000 Fashion-MNIST samples: `landscape_2d` against the original study's loop.

    python benchmarks/landscape.py [--run results/fashion_mnist/adam/seed0] [--n 2000] [--resolution 25] [--big 51] [--threads N] [--reps 3]

The original study (after PyHessian's example) deep-copied the model and, for every grid point, assigned
θ* + α·v1 + β·v2 to the copy's `.data` and ran one forward pass over all the samples, autograd on. Both variants get
the same model, samples and directions (the top two Hessian eigenvectors) in the same run, in interleaved rounds
(`timing.py`: repeated until every best time is stable, the spread and the machine's load printed); the table gives
their best seconds, the ratio and the largest difference between their surfaces. Then `landscape_2d` alone on a `--big` grid.
Without a trained run the weights are LeNet5's initial ones (the timing is the same, the surface is not).
"""
import argparse, copy, time
from pathlib import Path
import numpy as np, torch, torch.nn.functional as F
from secondorder_cnn.data import load_tensors, stratified_subset
from secondorder_cnn.model import LeNet5, to_device
from secondorder_cnn.landscape import check_range, hessian_directions, landscape_2d
from timing import Watch, rounds, summary, verdict


def original(model, x, y, d1, d2, alphas, betas):
    "The original study's loop: one deep copy, per point `.data` assignment and a forward pass with autograd on"
    perturbed, loss = copy.deepcopy(model), np.empty((len(alphas), len(betas)))
    for i, a in enumerate(alphas.tolist()):
        for j, b in enumerate(betas.tolist()):
            for p0, p, u, v in zip(model.parameters(), perturbed.parameters(), d1, d2): p.data = p0.data + a * u + b * v
            loss[i, j] = F.cross_entropy(perturbed(x), y).item()
    return loss


def timed(f, *args):
    t0 = time.perf_counter(); r = f(*args)
    return time.perf_counter() - t0, r


def run_variants(variants:dict, reps:int) -> tuple[dict, dict, Watch]:
    "Interleaved rounds of {name: (f, args)}: the seconds of each round, each variant's surface, the load watch"
    out = {}
    def one(k, f, args):
        def g():
            t, out[k] = timed(f, *args)
            return t
        return g
    with Watch() as watch: times = rounds({k: one(k, *v) for k, v in variants.items()}, min_rounds=reps)
    return times, out, watch


def main(run='results/fashion_mnist/adam/seed0', n=2000, resolution=25, big=51, threads=None, reps=3):
    if threads: torch.set_num_threads(threads)
    model = LeNet5()
    f = Path(run)/'model.pt'
    if f.exists(): model.load_state_dict(torch.load(f, weights_only=True))
    x, y = load_tensors('fashion_mnist', True)
    i = stratified_subset(y, n, seed=0)
    x, y = x[i], y[i]
    eigs, (v1, v2) = hessian_directions(model, F.cross_entropy, (x, y))
    al = check_range(-0.5, 0.5, resolution)
    moved = to_device(copy.deepcopy(model), 'cpu')
    times, out, watch = run_variants({
        'orig': (original, (model, x, y, v1, v2, al, al)),
        'ours': (lambda *a: landscape_2d(*a)[0], (moved, F.cross_entropy, (x, y), v1, v2, al, al)),
        'cont': (lambda *a: landscape_2d(*a)[0], (model, F.cross_entropy, (x, y), v1, v2, al, al))}, reps)
    (t_orig, s_orig), (t_ours, s_ours), (t_cont, s_cont) = (summary(times)[k] for k in ('orig', 'ours', 'cont'))
    l_orig, l_ours, l_cont = out['orig'], out['ours'], out['cont']
    ab = check_range(-0.5, 0.5, big)
    t_big, _ = timed(landscape_2d, to_device(copy.deepcopy(model), 'cpu'), F.cross_entropy, (x, y), v1, v2, ab, ab)
    print(f"LeNet5 {'from ' + str(f) if f.exists() else '(initial weights)'}, {n} Fashion-MNIST samples, directions v1, v2 "
          f"(λ1 {eigs[0]:.4g}, λ2 {eigs[1]:.4g}), CPU, {torch.get_num_threads()} threads, torch {torch.__version__}\n"
          f"{verdict(times, watch)}\n")
    print('| variant | grid | seconds | spread | ms / point | speed-up | max abs diff vs original | relative |')
    print('|---|---|---:|---:|---:|---:|---:|---:|')
    g = f'{resolution} × {resolution}'
    for name, t, sp, l in (('original loop (deepcopy, .data, autograd on)', t_orig, s_orig, l_orig),
                           ('landscape_2d, model in default layout', t_cont, s_cont, l_cont),
                           ('landscape_2d, model as to_device leaves it', t_ours, s_ours, l_ours)):
        print(f'| {name} | {g} | {t:.2f} | {sp:.2f} | {1000 * t / resolution**2:.1f} | {t_orig / t:.2f}× | '
              f'{np.abs(l - l_orig).max():.1e} | {(np.abs(l - l_orig) / np.abs(l_orig)).max():.1e} |')
    print(f'| landscape_2d, model as to_device leaves it | {big} × {big} | {t_big:.2f} | – | {1000 * t_big / big**2:.1f} | – | – | – |')
    print(f"\nlandscape_2d >= 4 x the original loop: {'met' if t_orig >= 4 * t_ours else 'not met'} ({t_orig / t_ours:.2f})")
    print(f'\nloss at the centre {l_orig[resolution // 2, resolution // 2]:.5f}, largest on the grid {l_orig.max():.4g}')


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--run', default='results/fashion_mnist/adam/seed0', help='a run folder with model.pt')
    p.add_argument('--n', type=int, default=2000)
    p.add_argument('--resolution', type=int, default=25)
    p.add_argument('--big', type=int, default=51)
    p.add_argument('--threads', type=int)
    p.add_argument('--reps', type=int, default=3, help='interleaved rounds at least (more until the best times are stable)')
    main(**vars(p.parse_args()))
