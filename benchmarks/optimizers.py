"""Time per step of every optimizer on LeNet5 with batches of 1,000 images on the CPU: against Adam, and ours against the peers.

    python benchmarks/optimizers.py [--steps 10] [--reps 3] [--dataset fashion_mnist] [--layout contiguous] [--threads N]

Every variant trains the same LeNet5 from the same weights on the same batches through `train_step`, so that a step
is the whole of it: forward, backward (with `create_graph` where the optimizer asks for it), Hessian-vector products,
update. The peers are driven by the same `train_step`; `torch_optimizer.Adahessian` draws its probes from torch's
global generator, seeded as ours, and `pytorch_optimizer.SophiaH` gets `create_graph` on its refresh steps, so ours
and the peer compute the same numbers (the last column). A step's time is the mean over `--steps` steps after one
untimed step, the best of `--reps` rounds, variants interleaved. The peers draw their probes in the weights' memory
order, ours in their logical order, so with `--layout channels_last` the peers' AdaHessian and SophiaH take other probes
than ours, and only the times compare.
"""
import argparse, copy, time
import torch
import torch_optimizer, pytorch_optimizer
from secondorder_cnn.data import get_dls
from secondorder_cnn.model import LeNet5, to_device
from secondorder_cnn.optimizers import OPTIMIZERS, make_optimizer, muon_groups, train_step

PEERS = {  # ours: (peer's name, how to build it, create_graph at step i)
    'adahessian': ('torch_optimizer.Adahessian', lambda m: torch_optimizer.Adahessian(m.parameters(), hessian_power=1), lambda i: True),
    'apollo': ('torch_optimizer.Apollo', lambda m: torch_optimizer.Apollo(m.parameters(), lr=0.5, warmup=100, init_lr=0.01), lambda i: False),
    'apollo-2023': ('pytorch_optimizer.ApolloDQN', lambda m: pytorch_optimizer.ApolloDQN(m.parameters(), lr=0.01, init_lr=1e-5, warmup_steps=500), lambda i: False),
    'muon': ('pytorch_optimizer.Muon', lambda m: pytorch_optimizer.Muon(
        [dict(params=g['params'], use_muon=g['muon']) for g in muon_groups(m)], weight_decay=0.01, adamw_wd=0.01), lambda i: False),
    'sophiah': ('pytorch_optimizer.SophiaH', lambda m: pytorch_optimizer.SophiaH(m.parameters(), update_period=10), lambda i: i % 10 == 0),
}
SEED = 12345


def timed(init, make, batches, create_graph=lambda i: None):
    "Mean seconds per step over `batches[1:]` (the first step is not timed), the trained model, and the step records"
    torch.manual_seed(SEED)  # the peers' probes come from the global generator
    model = copy.deepcopy(init)
    opt = make(model)
    recs = [train_step(model, opt, *batches[0], create_graph=create_graph(0))]
    t0 = time.perf_counter()
    for i, (xb, yb) in enumerate(batches[1:], 1): recs.append(train_step(model, opt, xb, yb, create_graph=create_graph(i)))
    return (time.perf_counter() - t0) / (len(batches) - 1), model, recs


def max_diff(a, b): return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def main(steps=10, reps=3, dataset='fashion_mnist', layout='contiguous', threads=None, bs=1000):
    if threads: torch.set_num_threads(threads)
    trn, _ = get_dls(dataset, bs=bs, device='cpu', seed=SEED)
    trn.shuffle = False
    batches = [b for b, _ in zip(trn, range(steps + 1))]
    torch.manual_seed(SEED)
    init = to_device(LeNet5(), 'cpu') if layout == 'channels_last' else LeNet5()
    ours = {k: (lambda m, k=k: make_optimizer(k, m, seed=SEED)) for k in OPTIMIZERS}
    variants = {**{k: (m, lambda i: None) for k, m in ours.items()}, **{v[0]: (v[1], v[2]) for v in PEERS.values()}}
    times, models, recs = {k: [] for k in variants}, {}, {}
    for _ in range(reps):
        for k, (make, cg) in variants.items():
            t, models[k], recs[k] = timed(init, make, batches, cg)
            times[k].append(t)
    best = {k: min(v) for k, v in times.items()}
    print(f"LeNet5 on {dataset}, batches of {bs}, {layout} weights, CPU, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"best of {reps} rounds of {steps} steps\n")
    print('| optimizer | ms / step | × Adam | loss evals / step | HVPs / step |')
    print('|---|---:|---:|---:|---:|')
    for k in OPTIMIZERS:
        r = recs[k][1:]
        print(f"| {k} | {1000 * best[k]:.1f} | {best[k] / best['adam']:.2f} | {sum(x['n_loss_evals'] for x in r) / len(r):.1f} | "
              f"{sum(x['n_hvp'] for x in r) / len(r):.1f} |")
    print('\n| ours | peer | ours ms / step | peer ms / step | ours / peer | max weight difference |')
    print('|---|---|---:|---:|---:|---:|')
    for k, (peer, _, _) in PEERS.items():
        print(f"| {k} | {peer} | {1000 * best[k]:.1f} | {1000 * best[peer]:.1f} | {best[k] / best[peer]:.2f} | {max_diff(models[k], models[peer]):.1e} |")
    ratios = [best[k] / best[p] for k, (p, _, _) in PEERS.items()]
    print(f"\ntargets: ours / peer <= 1.05: {'met' if max(ratios) <= 1.05 else 'not met'} (worst {max(ratios):.2f}); "
          f"AdaHessian <= 2.6 x Adam: {'met' if best['adahessian'] <= 2.6 * best['adam'] else 'not met'} ({best['adahessian'] / best['adam']:.2f})")


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--steps', type=int, default=10)
    p.add_argument('--reps', type=int, default=3)
    p.add_argument('--dataset', default='fashion_mnist')
    p.add_argument('--layout', default='contiguous', choices=['contiguous', 'channels_last'])
    p.add_argument('--threads', type=int, default=None, help="torch's CPU threads (default: torch's choice)")
    main(**vars(p.parse_args()))
