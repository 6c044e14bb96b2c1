"""One epoch of Adam (bs 1000) on real Fashion-MNIST: the original study's input pipeline against `get_dls`.

    python benchmarks/data.py [--reps 3] [--root DIR]

Baseline: torchvision's `FashionMNIST` with `Resize((32, 32))` + `ToTensor()` per sample, through a `DataLoader`
(as the original study's `load_data`). All variants train the same LeNet5 from the same initial weights on the
same batch order, so their final weights can be compared: the data path must not change a single bit, and the
`channels_last` layout changes only float32 rounding. Times are the best of `--reps` epochs, variants interleaved.
"""
import argparse, copy, tempfile, time
import torch, torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets import FashionMNIST
from secondorder_cnn.data import data_root, get_dls, load_tensors, tv_dataset
from secondorder_cnn.model import LeNet5, evaluate, to_device


def epoch(model, batches):
    "Seconds for one epoch of Adam over `batches`, and the trained model"
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    t0 = time.perf_counter()
    for xb, yb in batches:
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(); loss.backward(); opt.step()
    return time.perf_counter() - t0, model


def main(reps=3, root=None, bs=1000, seed=12345):
    with tempfile.TemporaryDirectory() as empty:  # first use: raw files staged, read, resized, cached
        t0 = time.perf_counter(); load_tensors('fashion_mnist', root=empty); t_load = time.perf_counter() - t0
    trn, tst = get_dls('fashion_mnist', bs=bs, root=root, device='cpu', seed=seed)
    order = torch.randperm(len(trn.y), generator=torch.Generator().manual_seed(seed))
    trn.shuffle = False  # every variant sees the same permutation of the training set
    trn.x, trn.y = trn.x[order], trn.y[order]
    ds = tv_dataset('fashion_mnist', True, root)
    orig = FashionMNIST(ds.root, train=True, transform=transforms.Compose([transforms.Resize((32, 32)), transforms.ToTensor()]))
    orig_dl = DataLoader(orig, batch_size=bs, sampler=order.tolist())
    torch.manual_seed(seed)
    init = LeNet5()
    variants = {'original pipeline (DataLoader + Resize + ToTensor)': (lambda: copy.deepcopy(init), orig_dl),
                'get_dls, default layout': (lambda: copy.deepcopy(init), trn),
                'get_dls + to_device (channels_last)': (lambda: to_device(copy.deepcopy(init), 'cpu'), trn)}
    times, models = {k: [] for k in variants}, {}
    for _ in range(reps):
        for k, (mk, batches) in variants.items():
            t, models[k] = epoch(mk(), batches)
            times[k].append(t)
    base = min(next(iter(times.values())))
    ref = next(iter(models.values()))
    print(f"Fashion-MNIST, 60,000 images, LeNet5, Adam, bs {bs}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"once per machine, preprocessing and caching the training set (load_tensors, empty cache): {t_load:.2f} s\n")
    print('| pipeline | s / epoch | speed-up | max abs weight diff vs original | test loss | test acc |')
    print('|---|---:|---:|---:|---:|---:|')
    for k, ts in times.items():
        diff = max((a - b).abs().max().item() for a, b in zip(models[k].parameters(), ref.parameters()))
        loss, acc = evaluate(models[k], tst)
        print(f'| {k} | {min(ts):.2f} | {base / min(ts):.2f}× | {diff:.1e} | {loss:.4f} | {acc:.2%} |')


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--reps', type=int, default=3)
    p.add_argument('--root', default=None)
    main(**vars(p.parse_args()))
