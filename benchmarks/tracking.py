"""What tracking the sharpness costs beside training, and how close its series is to cold, converged Lanczos runs.

    python benchmarks/tracking.py [--optimizers adam,sgd,apollo,sophiah,adahessian,lbfgs] [--epochs 3] [--every 30]
                                  [--samples 1000] [--threads 1] [--seed 0] [--save FILE] [--tol 1e-3]

Each optimizer trains LeNet5 on Fashion-MNIST as the fmnist preset's tracked runs do (batches of 1,000, the
settings of `results/tracked/fashion_mnist/<optimizer>/seed0/config.json` where it exists, the registry's
otherwise), for `--epochs` epochs, and at every `--every` steps three measurements are taken on the same weights,
on the tracked runs' fixed subset of `--samples` images:

- `until='value'`, the tracker's default: Lanczos warm-started from the last top vector, λ1 stopped once its
  estimated error is below `--tol` relative (1e-3, the tracker's default), λ1(P⁻¹H) at residual 1e-3;
- `until='vector'`, the tracker of the committed tracked runs: the same starts, both stopped at residual 1e-3;
- cold: Lanczos from a random vector, to residual 1e-6 or 200 steps — the reference.

Each tracker's time is its own measurements', training's time the steps' alone, so the share is tracking's seconds
over training's, both measured in the same process, interleaved; what else the machine ran is printed (`timing.py`). The table gives both shares, the products per measurement, and each tracked series' largest
relative difference from the cold one, for λ1 and, where the optimizer has a preconditioner, for the λ1 of P⁻¹H.
"""
import argparse, json, math, time
from pathlib import Path
import torch
from secondorder_cnn.data import get_dls
from secondorder_cnn.model import LeNet5, to_device
from secondorder_cnn.runs import Tracker, hessian_subset, train
from timing import Watch, busy, load_line

OPTIMIZERS = 'adam,sgd,apollo,sophiah,adahessian,lbfgs'


def settings(name:str) -> dict:
    "The tracked run's settings of optimizer `name`, or none (the registry's)"
    f = Path('results/tracked/fashion_mnist')/name/'seed0'/'config.json'
    return json.loads(f.read_text())['settings'] if f.exists() else {}


class Both:
    "A `train` callback running the cheap tracker, the committed runs' tracker and a cold reference on the same weights"
    def __init__(self, x, y, every, tol=1e-3):
        self.cheap, self.old = Tracker(x, y, every, tol=tol, until='value'), Tracker(x, y, every, until='vector')
        self.ref = Tracker(x, y, every, max_iter=200, tol=1e-6, until='vector')
        self.every = every

    @property
    def cold(self): return self.ref.records

    def __call__(self, model, opt, step, out=None):
        if step % self.every: return
        self.cheap(model, opt, step, out)
        self.old(model, opt, step, out)
        self.ref.v = self.ref.v_pre = None  # a random start every time
        self.ref(model, opt, step, out)


def worst(records, cold, key):
    "Largest relative difference of a tracked series from the cold one, where both have a value"
    d = [abs(r[key] - c[key]) / abs(c[key]) for r, c in zip(records, cold)
         if r.get(key) is not None and c.get(key) is not None]
    return max(d) if d else None


def main(optimizers=OPTIMIZERS, epochs=3, every=30, samples=1000, threads=1, seed=0, save=None, tol=1e-3):
    if threads: torch.set_num_threads(threads)
    x, y = hessian_subset('fashion_mnist', samples, 'cpu')
    print(f"LeNet5 on Fashion-MNIST, batches of 1000, {epochs} epochs, sharpness every {every} steps on {samples} "
          f"images, CPU, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| optimizer | training s | until='value': share of training | HVPs / measurement | worst λ1 diff "
          "| worst P⁻¹H λ1 diff | until='vector': share | HVPs / measurement | worst λ1 diff | worst P⁻¹H λ1 diff |")
    print('|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|')
    shares, saved, loads = {}, {}, []
    for name in optimizers.split(','):
        dls = get_dls('fashion_mnist', 1000, device='cpu', seed=seed)  # each run its own batches, as a tracked run's
        torch.manual_seed(seed)
        model = to_device(LeNet5.for_dataset('fashion_mnist'), 'cpu')
        cb = Both(x, y, every, tol)
        s = settings(name)
        with Watch() as watch: result = train(model, name, dls, epochs, seed=seed, callback=cb, overrides=s)
        loads.append(watch)
        t_train = sum(e['seconds'] for e in result['epochs'])
        row = [name, f'{t_train:.1f}']
        for tr in (cb.cheap, cb.old):
            sm = tr.summary()
            share = sm['seconds'] / t_train
            shares.setdefault(tr.until, {})[name] = share
            fmt = lambda v: '–' if v is None else f'{v:.1e}'
            row += [f'{100 * share:.1f}%', f"{sm['n_hvp'] / sm['n_measurements']:.1f}",
                    fmt(worst(sm['records'], cb.cold, 'lambda1')), fmt(worst(sm['records'], cb.cold, 'pre_lambda1'))]
        print('| ' + ' | '.join(row) + ' |', flush=True)
        saved[name] = dict(train_seconds=t_train, value=cb.cheap.summary(), vector=cb.old.summary(), cold=cb.cold)
        if save: Path(save).write_text(json.dumps(saved))
    print('\n' + '; '.join(f"{n}: {load_line(w)}" for n, w in zip(optimizers.split(','), loads)))
    if any(busy(w) for w in loads): print('NOT A RESULT: other work held the cores')
    cheap = shares['value']
    target = [k for k in ('adam', 'sgd', 'apollo', 'sophiah') if k in cheap]
    if target:
        w = max(target, key=cheap.get)
        print(f"\ntracking every {every} steps <= 15% of training for {', '.join(target)}: "
              f"{'met' if cheap[w] <= 0.15 else 'not met'} (largest {100 * cheap[w]:.1f}%, {w})")


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--optimizers', default=OPTIMIZERS)
    p.add_argument('--epochs', type=int, default=3)
    p.add_argument('--every', type=int, default=30)
    p.add_argument('--samples', type=int, default=1000)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--save', help='a JSON file for every measurement of the three')
    p.add_argument('--tol', type=float, default=1e-3, help="the cheap tracker's tolerance on λ1 (the committed: 1e-3)")
    main(**vars(p.parse_args()))
