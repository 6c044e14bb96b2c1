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
