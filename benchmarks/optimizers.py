"""Time per step of every optimizer on LeNet5 with batches of 1,000 images on the CPU: against Adam, and ours against the peers.

    python benchmarks/optimizers.py [--steps 10] [--reps 3] [--max-reps 15] [--dataset fashion_mnist] [--layout contiguous] [--threads N]
                                    [--optimizers adam,kfac,...]

The matrix methods refresh their preconditioners on a schedule (K-FAC's eigenbases and SOAP's every 10 steps,
Shampoo's roots every 100 from step 100): `--steps 100` or more times them amortised as the study runs them.

Every variant trains the same LeNet5 from the same weights on the same batches through `train_step`, so that a step
is the whole of it: forward, backward (with `create_graph` where the optimizer asks for it), Hessian-vector products,
update. The peers are driven by the same `train_step`; `torch_optimizer.Adahessian` draws its probes from torch's
global generator, seeded as ours, and `pytorch_optimizer.SophiaH` gets `create_graph` on its refresh steps, so ours
and the peer compute the same numbers (the last column). AdaHessian and SophiaH take their gradient and Hessian-vector
product in one forward-over-reverse pass; they are timed that way and, as `<name>, two passes`, by double backward as
the peers are, and the last column compares the peers with the two-pass variant: the one pass sums in another order,
and AdaHessian's division by |Hz| makes float32 runs drift apart from their first step (the optimizers chapter). A step's time is the mean over `--steps` steps after one
untimed step, the best of the rounds (`timing.py`: variants interleaved, at least `--reps` rounds and
more until every best time is stable, the spread and the machine's load printed, a loaded run flagged). The peers draw their probes in the weights' memory
order, ours in their logical order, so with `--layout channels_last` the peers' AdaHessian and SophiaH take other probes
than ours, and only the times compare.
"""
import argparse, copy, os, sys, time
import torch
import torch_optimizer, pytorch_optimizer
from pytorch_optimizer.optimizer.utils.graft import LayerWiseGrafting
from secondorder_cnn.data import get_dls
from secondorder_cnn.model import LeNet5, to_device
from secondorder_cnn.optimizers import OPTIMIZERS, make_optimizer, muon_groups, train_step
from timing import Watch, rounds, summary, verdict

PEERS = {  # ours: (peer's name, how to build it, create_graph at step i)
    'adahessian': ('torch_optimizer.Adahessian', lambda m: torch_optimizer.Adahessian(m.parameters(), hessian_power=1), lambda i: True),
    'apollo': ('torch_optimizer.Apollo', lambda m: torch_optimizer.Apollo(m.parameters(), lr=0.5, warmup=100, init_lr=0.01), lambda i: False),
    'apollo-2023': ('pytorch_optimizer.ApolloDQN', lambda m: pytorch_optimizer.ApolloDQN(m.parameters(), lr=0.01, init_lr=1e-5, warmup_steps=500), lambda i: False),
    'muon': ('pytorch_optimizer.Muon', lambda m: pytorch_optimizer.Muon(
        [dict(params=g['params'], use_muon=g['muon']) for g in muon_groups(m)], weight_decay=0.01, adamw_wd=0.01), lambda i: False),
    'sophiah': ('pytorch_optimizer.SophiaH', lambda m: pytorch_optimizer.SophiaH(m.parameters(), update_period=10), lambda i: i % 10 == 0),
    # the closest peers of the matrix methods with the study's schedules: only the times compare (see the chapter)
    'shampoo': ('pytorch_optimizer.ScalableShampoo', lambda m: pytorch_optimizer.ScalableShampoo(
        m.parameters(), start_preconditioning_step=100, preconditioning_compute_steps=100,
        graft_type=LayerWiseGrafting.RMSPROP), lambda i: False),
    'soap': ('pytorch_optimizer.SOAP', lambda m: pytorch_optimizer.SOAP(m.parameters()), lambda i: False),
    'kron': ('pytorch_optimizer.Kron', lambda m: pytorch_optimizer.Kron(
        m.parameters(), lr=2e-3, momentum=0.9, pre_conditioner_update_probability=1.), lambda i: False),
}


class KFACPytorch:
    "kfac-pytorch's KFACPreconditioner before torch.optim.SGD, behind the interface `train_step` drives"
    def __init__(self, model, lr=0.1, momentum=0.9, weight_decay=5e-4, **kw):
        from kfac.preconditioner import KFACPreconditioner
        self.sgd = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.param_groups, self.state = self.sgd.param_groups, self.sgd.state
        self.pre = KFACPreconditioner(model, lr=lr, **kw)

    def step(self, closure):
        loss = closure()
        self.pre.step()
        self.sgd.step()
        return loss


if os.path.isdir(os.path.join(os.environ.get('KFAC_PYTORCH_SRC', ''), 'kfac')):  # not on PyPI: from its source
    sys.path.insert(0, os.environ['KFAC_PYTORCH_SRC'])
    PEERS['kfac'] = ('kfac-pytorch', lambda m: KFACPytorch(m, damping=0.003, factor_decay=0.95, kl_clip=0.001,
                                                           factor_update_steps=1, inv_update_steps=10), lambda i: False)
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


def main(steps=10, reps=3, max_reps=15, dataset='fashion_mnist', layout='contiguous', threads=None, bs=1000, optimizers=None):
    if threads: torch.set_num_threads(threads)
    trn, _ = get_dls(dataset, bs=bs, device='cpu', seed=SEED)
    trn.shuffle = False
    batches = [b for b, _ in zip(trn, range(steps + 1))]
    torch.manual_seed(SEED)
    init = to_device(LeNet5(), 'cpu') if layout == 'channels_last' else LeNet5()
    names = ['adam', *(k for k in optimizers.split(',') if k != 'adam')] if optimizers else list(OPTIMIZERS)
    peers = {k: v for k, v in PEERS.items() if k in names}
    ours = {k: (lambda m, k=k: make_optimizer(k, m, seed=SEED)) for k in names}
    two = {f'{k}, two passes': (lambda m, k=k: make_optimizer(k, m, seed=SEED, fused=False))
           for k in names if getattr(OPTIMIZERS[k].cls, 'fuses', None) is not None}
    variants = {**{k: (m, lambda i: None) for k, m in (ours | two).items()},
                **{v[0]: (v[1], v[2]) for v in peers.values()}}
    models, recs = {}, {}
    def variant(k, make, cg):
        def f():
            t, models[k], recs[k] = timed(init, make, batches, cg)
            return t
        return f
    with Watch() as watch:
        times = rounds({k: variant(k, *v) for k, v in variants.items()}, min_rounds=reps, max_rounds=max_reps)
    best, spread = {k: v[0] for k, v in summary(times).items()}, {k: v[1] for k, v in summary(times).items()}
    print(f"LeNet5 on {dataset}, batches of {bs}, {layout} weights, CPU, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"best of the interleaved rounds of {steps} steps\n{verdict(times, watch)}\n")
    print('| optimizer | ms / step | × Adam | spread | loss evals / step | HVPs / step |')
    print('|---|---:|---:|---:|---:|---:|')
    for k in [*names, *two]:
        r = recs[k][1:]
        print(f"| {k} | {1000 * best[k]:.1f} | {best[k] / best['adam']:.2f} | {spread[k]:.2f} | "
              f"{sum(x['n_loss_evals'] for x in r) / len(r):.1f} | {sum(x['n_hvp'] for x in r) / len(r):.1f} |")
    print('\n| ours | peer | ours ms / step | peer ms / step | ours / peer | max weight difference |')
    print('|---|---|---:|---:|---:|---:|')
    for k, (peer, _, _) in peers.items():
        same = f'{k}, two passes' if f'{k}, two passes' in models else k  # the peers' double backward: the same numbers
        print(f"| {k} | {peer} | {1000 * best[k]:.1f} | {1000 * best[peer]:.1f} | {best[k] / best[peer]:.2f} | "
              f"{max_diff(models[same], models[peer]):.1e} |")
    ratios = {k: best[k] / best[p] for k, (p, _, _) in peers.items()}
    if ratios: print(f"\nworst ours / peer: {max(ratios.values()):.2f} ({max(ratios, key=ratios.get)})")
    for k, most in dict(adahessian=2.6, sophiah=1.1, kfac=2., shampoo=2., muon=1.3).items():
        if k in best: print(f"{k} <= {most} x Adam: {'met' if best[k] <= most * best['adam'] else 'not met'} ({best[k] / best['adam']:.2f})")


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--steps', type=int, default=10)
    p.add_argument('--reps', type=int, default=3, help='rounds at least')
    p.add_argument('--max-reps', type=int, default=15, help='rounds at most, until every best time is stable')
    p.add_argument('--dataset', default='fashion_mnist')
    p.add_argument('--layout', default='contiguous', choices=['contiguous', 'channels_last'])
    p.add_argument('--threads', type=int, default=None, help="torch's CPU threads (default: torch's choice)")
    p.add_argument('--optimizers', default=None, help='comma-separated keys of OPTIMIZERS, Adam always (default: all)')
    main(**vars(p.parse_args()))
