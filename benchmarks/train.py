"""Seconds per epoch of every optimizer of the `fmnist` preset on Fashion-MNIST (batches of 1,000), against Adam; the preset's wall time.

    python benchmarks/train.py [--epochs 1] [--reps 2] [--threads N] [--full] [--results results]

Each optimizer trains the same LeNet5 from the same weights on the same batches through `runs.train`, which
is what `secondorder-cnn run` does (forward, backward, Hessian-vector products, update; the test-set evaluation
after each epoch is timed apart). A row gives the best of `--reps` rounds, optimizers interleaved, with the loss
evaluations and HVPs per epoch that explain the ratio. The preset's wall time (6 optimizers × 3 seeds × 10 epochs)
is estimated from these; `--full` runs the whole preset for one seed in a temporary folder and times it; and the
time recorded in the committed runs under `--results` is added when they are there.
"""
import argparse, copy, json, tempfile, time
from pathlib import Path
import torch
from secondorder_cnn.data import get_dls
from secondorder_cnn.model import LeNet5, evaluate, to_device
from secondorder_cnn.experiments import PRESETS, plan, run_grid
from secondorder_cnn.runs import train


def main(epochs=1, reps=2, threads=None, full=False, results='results'):
    if threads: torch.set_num_threads(threads)
    p = PRESETS['fmnist']
    trn, tst = get_dls('fashion_mnist', bs=p['bs'], device='cpu', seed=0)
    torch.manual_seed(0)
    init = to_device(LeNet5(), 'cpu')
    t0 = time.perf_counter(); evaluate(init, tst); t_eval = time.perf_counter() - t0
    best, recs = {}, {}
    for _ in range(reps):
        for o in p['optimizers']:
            trn.epoch = 0
            r = train(copy.deepcopy(init), o, (trn, tst), epochs)
            s = sum(e['seconds'] for e in r['epochs']) / epochs
            if s < best.get(o, float('inf')): best[o], recs[o] = s, r['epochs'][-1]
    print(f"LeNet5 on Fashion-MNIST, batches of {p['bs']}, channels_last, CPU, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"best of {reps} rounds of {epochs} epoch(s)\n")
    print('| optimizer | s / epoch | × Adam | loss evals / epoch | HVPs / epoch |')
    print('|---|---:|---:|---:|---:|')
    for o in p['optimizers']:
        print(f"| {o} | {best[o]:.2f} | {best[o] / best['adam']:.2f}× | {recs[o]['n_loss_evals']} | {recs[o]['n_hvp']} |")
    n_seeds, n_ep = 3, p['epochs']
    est = n_seeds * n_ep * (sum(best.values()) + len(best) * t_eval)
    print(f"\ntest-set evaluation {t_eval:.2f} s per epoch; the fmnist preset, {len(best)} optimizers × {n_seeds} seeds × {n_ep} epochs: "
          f"{est / 60:.1f} min estimated")
    if full:
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter(); run_grid(plan('fmnist', seeds='0'), d, device='cpu', log=None)
            t = time.perf_counter() - t0
        print(f"the fmnist preset for one seed, measured: {t / 60:.1f} min (× {n_seeds} seeds: {n_seeds * t / 60:.1f} min)")
    fs = sorted(Path(results).glob('fashion_mnist/*/seed*/metrics.json'))
    if fs:
        ms = [json.loads(f.read_text()) for f in fs]
        s = sum(e['seconds'] for m in ms for e in m['epochs'])
        print(f"recorded in {results}/fashion_mnist ({len(ms)} runs): {s / 60:.1f} min of training epochs")


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--epochs', type=int, default=1)
    ap.add_argument('--reps', type=int, default=2)
    ap.add_argument('--threads', type=int)
    ap.add_argument('--full', action='store_true', help='also time the whole preset for one seed')
    ap.add_argument('--results', default='results')
    main(**vars(ap.parse_args()))
