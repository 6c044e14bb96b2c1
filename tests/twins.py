"""What the tests of the optimizers share: float64 LeNet5s and digits batches for step-by-step identity checks"""
from secondorder_cnn.data import get_dls
from secondorder_cnn.model import LeNet5
from secondorder_cnn.optimizers import train_step
import torch


def digit_batches(n=20, bs=16) -> list:
    "`n` batches of `bs` digits in float64"
    trn, _ = get_dls('digits', bs=bs, device='cpu')
    return [(xb.double(), yb) for (xb, yb), _ in zip(trn, range(n))]


def lenet64(seed=0):
    torch.manual_seed(seed)
    return LeNet5().double()


def run(model, opt, batches, **kw):
    return [train_step(model, opt, xb, yb, **kw) for xb, yb in batches]


def max_diff(a, b): return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def least_squares(make, steps=1000):
    "½ mean((Xw - y)²) with an exact solution y = Xw*: the losses of `steps` steps of `make(model)`, |w - w*|, λ1(H)"
    torch.manual_seed(0)
    X = torch.randn(64, 8, dtype=torch.float64)
    w_star = 0.1 * torch.randn(8, dtype=torch.float64)
    crit = lambda out, y: ((out.squeeze(1) - y)**2).mean() / 2
    m = torch.nn.Linear(8, 1, bias=False).double()
    torch.nn.init.zeros_(m.weight)
    opt = make(m)
    losses = [train_step(m, opt, X, X @ w_star, crit)['loss'] for _ in range(steps)]
    return losses, (m.weight.detach()[0] - w_star).abs().max().item(), torch.linalg.eigvalsh(X.T @ X / 64).max().item()
