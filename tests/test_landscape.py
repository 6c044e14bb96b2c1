import copy, json, subprocess, sys
from pathlib import Path
import pytest, torch, torch.nn.functional as F
from torch import nn
from secondorder_cnn.data import load_tensors, stratified_subset
from secondorder_cnn.model import LeNet5
from secondorder_cnn.landscape import landscape_1d, landscape_2d, random_direction, orthogonalize, hessian_directions
from conftest import snapshot

CMD = [sys.executable, '-c', 'from secondorder_cnn.cli import main; main()']
pytestmark = pytest.mark.usefixtures('one_thread')


def cli(*args): return subprocess.run([*CMD, *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope='module')
def results(tmp_path_factory):
    "Two one-epoch digits runs and their landscapes on a 5-point grid, made by the command"
    out = tmp_path_factory.mktemp('lsc')/'results'
    r = cli('run', '--optimizers', 'adam,sgd', '--epochs', '1', '--bs', '256', '--device', 'cpu', '--out', out)
    assert r.returncode == 0, r.stderr
    before = {o: (out/'digits'/o/'seed0'/'model.pt').read_bytes() for o in ('adam', 'sgd')}
    r = cli('landscape', '--out', out, '--samples', '200', '--resolution', '5', '--device', 'cpu')
    assert r.returncode == 0, r.stderr
    return out, before, r


def test_cli_writes_json_pages_and_index(results):
    out, before, r = results
    assert r.stdout.splitlines()[0].startswith('digits/adam/seed0: loss ')
    for o in ('adam', 'sgd'):
        d = out/'digits'/o/'seed0'
        assert (d/'model.pt').read_bytes() == before[o]  # the weights are untouched
        ls = json.loads((d/'landscape.json').read_text())
        assert (ls['resolution'], ls['range'], ls['n_samples'], ls['seed']) == (5, [-0.5, 0.5], 200, 0)
        assert len(ls['loss']) == 5 and all(len(r) == 5 for r in ls['loss']) and len(ls['v1_loss']) == 5 == len(ls['random_loss'])
        assert ls['eigenvalues'][0] >= ls['eigenvalues'][1]
        page = (d/'landscape.html').read_text()
        assert '<script src="../../../plotly.min.js">' in page and page.count('class="plotly-graph-div"') == 2
    index = (out/'landscape.html').read_text()
    assert 'digits/adam/seed0/landscape.html' in index and 'digits/sgd/seed0/landscape.html' in index
    assert (out/'plotly.min.js').stat().st_size > 10**6 and 'cdn' not in index.lower()


def test_centre_is_the_plain_loss(results):
    out = results[0]
    d = out/'digits'/'adam'/'seed0'
    m = LeNet5()
    m.load_state_dict(torch.load(d/'model.pt', weights_only=True))
    x, y = load_tensors('digits', True)
    i = stratified_subset(y, 200, seed=0)
    with torch.no_grad(): loss = F.cross_entropy(m(x[i]), y[i]).item()
    ls = json.loads((d/'landscape.json').read_text())
    assert ls['loss'][2][2] == pytest.approx(loss, rel=1e-5) and ls['v1_loss'][2] == pytest.approx(loss, rel=1e-5)


def test_rerun_skips_finished_landscapes(results):
    out = results[0]
    snap = snapshot(out/'digits')
    r = cli('landscape', '--out', out, '--samples', '200', '--resolution', '5', '--device', 'cpu')
    assert r.returncode == 0 and r.stdout.splitlines() == ['digits/adam/seed0: landscape present, skipped', 'digits/sgd/seed0: landscape present, skipped']
    assert snapshot(out/'digits') == snap


@pytest.mark.parametrize('args, msg', [
    (['--range', '0.5,-0.5'], "range '0.5,-0.5' (0.5, -0.5) must be finite and increasing"),
    (['--range', 'nan,1'], "must be finite and increasing"),
    (['--range', 'a,b'], "range 'a,b' must be 'lo,hi' or one number r for -r,r"),
    (['--range', '1,2,3'], "range '1,2,3' must be 'lo,hi'"),
    (['--resolution', '1'], 'resolution 1 must be an integer >= 2'),
    (['--samples', '0'], 'samples 0 must be an integer >= 1'),
    (['--optimizers', 'rmsprop'], "optimizer 'rmsprop' is not allowed"),
    (['--datasets', 'imagenet'], 'imagenet'),
])
def test_bad_input_is_one_line_and_changes_nothing(results, args, msg):
    out = results[0]
    snap = snapshot(out)
    r = cli('landscape', '--out', out, '--device', 'cpu', *args)
    assert r.returncode == 2 and r.stdout == ''
    assert r.stderr.startswith('secondorder-cnn: error: ') and msg in r.stderr and r.stderr.count('\n') == 1, r.stderr
    assert snapshot(out) == snap


def test_missing_model_corrupt_json_and_empty_folder(results, tmp_path):
    out = tmp_path/'copy'
    subprocess.run(['cp', '-r', str(results[0]), str(out)], check=True)
    (out/'digits'/'sgd'/'seed0'/'landscape.json').write_text('{"loss": [')
    r = cli('landscape', '--out', out, '--samples', '200', '--resolution', '5', '--device', 'cpu')
    assert r.returncode == 2 and 'landscape.json is corrupt: delete it, or rerun with --force' in r.stderr
    r = cli('landscape', '--out', out, '--samples', '200', '--resolution', '5', '--device', 'cpu', '--force', '--optimizers', 'sgd')
    assert r.returncode == 0, r.stderr
    assert len(json.loads((out/'digits'/'sgd'/'seed0'/'landscape.json').read_text())['loss']) == 5
    (out/'digits'/'adam'/'seed0'/'model.pt').unlink()
    snap = snapshot(out)
    r = cli('landscape', '--out', out, '--device', 'cpu')
    assert r.returncode == 2 and 'has no model.pt' in r.stderr and r.stderr.count('\n') == 1
    assert snapshot(out) == snap
    r = cli('landscape', '--out', tmp_path/'nothing', '--device', 'cpu')
    assert r.returncode == 2 and r.stderr.count('\n') == 1 and not (tmp_path/'nothing').exists()


def test_model_untouched_and_direction_checks():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3), nn.Dropout(0.5)).train()
    m[0].weight.requires_grad_(False)  # frozen: no direction for it
    x, y = torch.randn(30, 1, 8, 8), torch.randint(0, 3, (30,))
    state, flags = copy.deepcopy(m.state_dict()), [p.requires_grad for p in m.parameters()]
    d1, d2 = random_direction(m, seed=0), random_direction(m, seed=1)
    assert len(d1) == 5  # the frozen weight is left out
    l, a = landscape_2d(m, F.cross_entropy, (x, y), d1, orthogonalize(d1, d2), [-1, 0, 1], [-1, 0, 1], bs=7)
    assert l.shape == a.shape == (3, 3)
    assert all(torch.equal(state[k], v) for k, v in m.state_dict().items())  # BatchNorm's running stats included
    assert m.training and all(c.training for c in m.modules()) and [p.requires_grad for p in m.parameters()] == flags
    m.eval()
    with torch.no_grad(): assert l[1, 1] == pytest.approx(F.cross_entropy(m(x), y).item(), rel=1e-6)
    with pytest.raises(ValueError, match='direction has 4 tensors'): landscape_1d(m, F.cross_entropy, (x, y), d1[:4], [0, 1])
    with pytest.raises(ValueError, match=r'data must be a non-empty'): landscape_1d(m, F.cross_entropy, (x[:0], y[:0]), d1, [0, 1])
    with pytest.raises(ValueError, match='bs 0 must be an integer >= 1'): landscape_1d(m, F.cross_entropy, (x, y), d1, [0, 1], bs=0)


# ---------- the shortcuts of the evaluation against the plain loop ----------

def naive_2d(model, x, y, d1, d2, alphas, betas):
    "The loss at every grid point by the book: the weights set, one plain forward pass in eval mode"
    m, out = copy.deepcopy(model).eval(), torch.empty(len(alphas), len(betas), dtype=torch.float64)
    ps = [p for p in m.parameters() if p.requires_grad]
    theta = [p.detach().clone() for p in ps]
    with torch.no_grad():
        for i, a in enumerate(alphas.tolist()):
            for j, b in enumerate(betas.tolist()):
                for p, t, u, v in zip(ps, theta, d1, d2): p.copy_(t + a * u + b * v)
                out[i, j] = F.cross_entropy(m(x), y).double()
    return out.numpy()


class Scaled(nn.Module):
    "A first convolution that does not see the data itself, a padded and a grouped one, and a whole-input one"
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, groups=2)
        self.c3, self.fc = nn.Conv2d(4, 6, 6), nn.Linear(6, 10)
    def forward(self, x): return self.fc(self.c3(torch.relu(self.c2(torch.relu(self.c1(2 * x))))).flatten(1))


@pytest.mark.parametrize('make', [lambda: LeNet5(), Scaled])
@pytest.mark.parametrize('frozen', [False, True])
def test_grid_equals_the_plain_loop(make, frozen):
    torch.manual_seed(0)
    model = make()
    x = torch.randn(37, 1, 32, 32) if isinstance(model, LeNet5) else torch.randn(37, 1, 8, 8)
    y = torch.randint(0, 10, (37,))
    first = next(model.parameters())
    if frozen: first.requires_grad_(False)  # a layer of the first convolution not trained: its own weights
    d1, d2 = (random_direction(model, seed=s) for s in (1, 2))
    al, be = torch.linspace(-1, 1, 5, dtype=torch.float64), torch.linspace(-0.5, 0.5, 3, dtype=torch.float64)
    want = naive_2d(model, x, y, d1, d2, al, be)
    got, _ = landscape_2d(model, F.cross_entropy, (x, y), d1, d2, al, be, bs=16)  # 15 points: groups of 4 and a last 3
    assert abs(got - want).max() <= 1e-5 * abs(want).max()
