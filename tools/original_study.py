"""Replay the original study's training loop in its own software environment.

The original study ("Second-order-optim-ConvNets") trained LeNet5 on Fashion-MNIST with batch 1000 for 10 epochs,
seed 12345, under torch 1.8.0 on the CPU. Its AdaHessian run ended at 80.74% test accuracy, about 5 points below what
other seeds give. This script runs the same loop, written out here, in that environment (Python 3.9, torch 1.8.0,
torch-optimizer 0.3.0; no torchvision), so one can see whether the published numbers come back and how much the
result moves from seed to seed.

What it keeps from the original, since each of these decides the random stream or the numbers:
  * `torch.manual_seed(seed)` once, before the data loaders and the model are built;
  * LeNet5: convs 1->6->16->120 (kernel 5, ReLU, 2x2 max-pool after the first two), linear 120->84->10;
  * images resized 28->32 with PIL bilinear (as torchvision's Resize on PIL images) and scaled to [0, 1];
  * torch's own DataLoader, shuffle=True for training and shuffle=False for the test set, batch 1000;
  * per batch: the closure (zero_grad, forward, loss, backward) once for the logged loss, then `step(closure)`;
    training accuracy from a forward pass after the step; `create_graph=True` for AdaHessian;
  * AdaHessian's defaults as the original used them (lr 0.15, betas (0.9, 0.999), eps 1e-4, no weight decay,
    Hessian power 1), Hutchinson probes drawn from the global generator; Adam with torch's defaults;
    L-BFGS with history 5, 4 iterations per step and strong-Wolfe line search.

Run (the environment is made by tools/original_env.sh):
    tools/.venv-original/bin/python tools/original_study.py --optimizer adahessian --seed 12345 --out run.json
It prints one line per epoch and writes a JSON file with the per-epoch training and test losses and accuracies.
The numbers depend, beyond the seed, on the number of CPU threads (OMP_NUM_THREADS): AdaHessian amplifies the
rounding differences, so runs with 1 and 2 threads part in the fourth digit of the loss within one epoch.
"""
import argparse
import gzip
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

SETTINGS = {
    'adahessian': dict(lr=0.15, betas=(0.9, 0.999), eps=1e-4, weight_decay=0, hessian_power=1),
    'adam': dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0),
    'lbfgs': dict(lr=1, history_size=5, max_iter=4, line_search_fn='strong_wolfe'),
}


def make_optimizer(name, params):
    if name == 'adahessian':
        import torch_optimizer
        return torch_optimizer.Adahessian(params, **SETTINGS[name])
    if name == 'adam':
        return torch.optim.Adam(params, **SETTINGS[name])
    return torch.optim.LBFGS(params, **SETTINGS[name])


class LeNet5(nn.Module):
    def __init__(self):
        super().__init__()
        self.feature_extractor = nn.Sequential(
            nn.Conv2d(1, 6, kernel_size=5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 120, kernel_size=5), nn.ReLU())
        self.classifier = nn.Sequential(nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))

    def forward(self, x):
        return self.classifier(torch.flatten(self.feature_extractor(x), 1))


def read_idx(path):
    "Array from an IDX file (gzipped or not)."
    raw = (gzip.open if str(path).endswith('.gz') else open)(path, 'rb').read()
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def find(data_dir, stem):
    for name in (stem + '.gz', stem):
        if (Path(data_dir) / name).exists():
            return Path(data_dir) / name
    raise FileNotFoundError(f'{stem}[.gz] not in {data_dir}')


def load_split(data_dir, prefix):
    "Images resized to 32x32 by PIL bilinear, as float in [0, 1] shaped (N, 1, 32, 32); labels as int64."
    images = read_idx(find(data_dir, f'{prefix}-images-idx3-ubyte'))
    labels = read_idx(find(data_dir, f'{prefix}-labels-idx1-ubyte'))
    big = np.stack([np.asarray(Image.fromarray(im).resize((32, 32), Image.BILINEAR)) for im in images])
    x = torch.from_numpy(big).unsqueeze(1).float().div(255)
    return TensorDataset(x, torch.from_numpy(labels.astype(np.int64)))


def num_correct(pred, target):
    return (F.softmax(pred, dim=1).argmax(dim=1) == target).sum().item()


def run(optimizer_name, seed, data_dir, bs=1000, epochs=10):
    torch.manual_seed(seed)
    train_loader = DataLoader(load_split(data_dir, 'train'), batch_size=bs, shuffle=True)
    test_loader = DataLoader(load_split(data_dir, 't10k'), batch_size=bs, shuffle=False)
    model, criterion = LeNet5(), nn.CrossEntropyLoss()
    opt = make_optimizer(optimizer_name, model.parameters())
    create_graph = optimizer_name == 'adahessian'
    hist = {k: [] for k in ('training_losses', 'test_losses', 'training_accuracies', 'test_accuracies', 'seconds')}
    n_train, n_test = len(train_loader.dataset), len(test_loader.dataset)
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        total, correct = 0., 0
        for x, target in train_loader:
            def closure():
                opt.zero_grad()
                loss = criterion(model(x), target)
                loss.backward(create_graph=create_graph)
                return loss
            total += closure().item() * x.size(0)
            opt.step(closure)
            with torch.no_grad():
                correct += num_correct(model(x), target)
        hist['training_losses'].append(total / n_train)
        hist['training_accuracies'].append(correct / n_train)
        model.eval()
        total, correct = 0., 0
        with torch.no_grad():
            for x, target in test_loader:
                pred = model(x)
                total += criterion(pred, target).item() * x.size(0)
                correct += num_correct(pred, target)
        hist['test_losses'].append(total / n_test)
        hist['test_accuracies'].append(correct / n_test)
        hist['seconds'].append(round(time.time() - t0, 1))
        print(f"epoch {epoch + 1}: train loss {hist['training_losses'][-1]:.4f} "
              f"acc {100 * hist['training_accuracies'][-1]:.2f}% | test loss {hist['test_losses'][-1]:.4f} "
              f"acc {100 * hist['test_accuracies'][-1]:.2f}% | {hist['seconds'][-1]:.0f}s", flush=True)
    return hist


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--optimizer', choices=sorted(SETTINGS), default='adahessian')
    p.add_argument('--seed', type=int, default=12345)
    p.add_argument('--epochs', type=int, default=10)
    p.add_argument('--bs', type=int, default=1000)
    p.add_argument('--data', default='/usr/share/datasets/fashion-mnist')
    p.add_argument('--out', required=True)
    a = p.parse_args()
    hist = run(a.optimizer, a.seed, a.data, a.bs, a.epochs)
    res = dict(dataset='Fashion-MNIST', optimizer=a.optimizer, seed=a.seed, bs=a.bs, epochs=a.epochs,
               torch=torch.__version__, python=platform.python_version(), threads=torch.get_num_threads(),
               settings={k: list(v) if isinstance(v, tuple) else v for k, v in SETTINGS[a.optimizer].items()},
               **hist)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1) + '\n')


if __name__ == '__main__':
    main()
