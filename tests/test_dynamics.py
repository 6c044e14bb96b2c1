"Curvature tracking and the edge-of-stability command: bad input is one line, tracking leaves training as it was"
import json
import pytest, torch
from secondorder_cnn.cli import main
from secondorder_cnn.hessian import HessianOperator
from secondorder_cnn.model import LeNet5
from secondorder_cnn.runs import Run, parse_track, run_one
from test_bad_input_cli import fails

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.mark.parametrize('s, msg', [
    ('', "track: unknown setting ''"),
    ('every=5,foo=1', "track: unknown setting 'foo' in 'every=5,foo=1'; allowed: every=K, samples=N, trace or trace=M"),
    ('samples=100', "track 'samples=100' lacks every=K"),
    ('every=0', 'track: every 0 must be an integer >= 1'),
    ('every=ten', "track: every 'ten' must be an integer >= 1"),
    ('every=5,samples=-3', 'track: samples -3 must be an integer >= 1'),
    ('every=5,trace=1', 'track: trace 1 must be 0 (no trace) or an integer >= 3'),
    ('every=５', "track: every '５' must be an integer"), ('every=+3', "track: every '+3' must be"),
    ('every=5,every=6', "track: every is given twice in 'every=5,every=6'"),
    (None, 'track None must be text like')])
def test_bad_track_is_one_line(s, msg):
    with pytest.raises(ValueError) as e: parse_track(s)
    assert msg in str(e.value) and '\n' not in str(e.value)
    if s is not None:
        with pytest.raises(ValueError): Run('digits', 'adam', 0, 1, 256, track=s)


def test_unknown_parameter_names_are_one_line():
    m = LeNet5()
    x, y = torch.randn(4, 1, 32, 32), torch.arange(4)
    for bad, msg in [(['classifier.0', 'fc1'], "unknown parameter or module name 'fc1'; allowed: 'feature_extractor.0', "
                                               "'feature_extractor.3', 'feature_extractor.6', 'classifier.0', 'classifier.2'"),
                     ('classifier.0.weigth', "unknown parameter or module name 'classifier.0.weigth'"),
                     (3, 'params 3 must be names of parameters or modules, modules, or a predicate'),
                     ([torch.nn.Linear(2, 2)], 'is not inside the model')]:
        with pytest.raises(ValueError) as e: HessianOperator(m, torch.nn.functional.cross_entropy, data=(x, y), params=bad)
        assert msg in str(e.value) and '\n' not in str(e.value)


def test_tracking_does_not_change_training(tmp_path):
    "The same weights, bit for bit, with and without tracking; the untracked config as it always was"
    plain, tracked = Run('digits', 'adahessian', 0, 1, 256), Run('digits', 'adahessian', 0, 1, 256,
                                                                         track='every=2,samples=100')
    a, b = run_one(plain, tmp_path/'a', 'cpu'), run_one(tracked, tmp_path/'b', 'cpu')
    assert (plain.folder(tmp_path/'a')/'model.pt').read_bytes() == (tracked.folder(tmp_path/'b')/'model.pt').read_bytes()
    assert list(a['config']) == ['dataset', 'optimizer', 'seed', 'epochs', 'bs', 'settings']
    assert b['config'] == a['config'] | dict(track=dict(every=2, samples=100, trace=0))
    assert [e['train_loss'] for e in a['epochs']] == [e['train_loss'] for e in b['epochs']]
    assert (tracked.folder(tmp_path/'b')/'dynamics.json').exists()
    assert not (plain.folder(tmp_path/'a')/'dynamics.json').exists()


EDGE = [  # arguments of `edge` after --out, and what the error must say
    (['--methods', 'gd,sgd'], "method 'sgd' is not allowed; allowed: 'gd', 'momentum', 'adam'"),
    (['--methods', ','], 'methods is empty'),
    (['--lrs', '0.1,fast'], "lr 'fast' must be a finite number > 0"),
    (['--lrs', '-1'], "lr '-1' must be a finite number > 0"),
    (['--samples', '0'], 'samples 0 must be an integer >= 1'),
    (['--steps', 'ten'], "argument --steps: invalid int value: 'ten'"),
    (['--every', '0'], 'every 0 must be an integer >= 1'),
    (['--trace', '-1'], 'trace -1 must be an integer >= 0'),
    (['--trace', '1'], 'trace 1 must be 0 (no trace) or an integer >= 3'),
    (['--trace', '2'], 'Hutch++ takes three products at least'),
    (['--target-loss', '-1'], 'target_loss -1.0 must be a finite number >= 0'),
    (['--seed', '-2'], "seed -2 must be an integer >= 0"),
    (['--dataset', 'imagenet'], "unknown dataset 'imagenet'"),
    (['--device', 'gpu0'], "unknown device 'gpu0'"),
    (['--bogus'], 'unrecognized arguments: --bogus')]


@pytest.mark.parametrize('args, msg', EDGE)
def test_edge_bad_input_exits_2_with_one_line(args, msg, tmp_path, capsys):
    assert msg in fails(['edge', '--out', tmp_path/'edge', *args], capsys)
    assert not (tmp_path/'edge').exists() or not any((tmp_path/'edge').rglob('*.json'))


def test_layers_command_stores_a_block_per_layer(tmp_path):
    out = tmp_path/'results'
    main(['run', '--optimizers', 'adam', '--epochs', '1', '--bs', '256', '--device', 'cpu', '--out', str(out)])
    args = ['--out', str(out), '--device', 'cpu', '--samples', '100']
    main(['layers', *args, '--max-iter', '10', '--max-hvp', '9'])
    main(['curvature', *args, '--max-iter', '10', '--max-hvp', '300', '--slq-iter', '5', '--slq-runs', '1'])
    ls = json.loads((out/'digits/adam/seed0/layers.json').read_text())
    assert list(ls['layers']) == ['feature_extractor.0', 'feature_extractor.3', 'feature_extractor.6', 'classifier.0',
                                  'classifier.2']
    assert sum(v['n_params'] for v in ls['layers'].values()) == sum(p.numel() for p in LeNet5().parameters())
    assert ls['computed_from']['max_hvp'] == 9 and ls['n_samples'] == 100
    c = json.loads((out/'digits/adam/seed0/curvature.json').read_text())
    assert all(0 < v['lambda1'] <= c['top_eigenvalues'][0] * 1.01 for v in ls['layers'].values())  # a block's λ1 ≤ λ1


@pytest.mark.parametrize('name, threshold', [('kfac', 3.8 / 0.1), ('soap', 3.9 / (0.05 * 3e-3)), ('kron', 3.8 / 2e-4),
                                             ('muon', None)])
def test_tracking_the_matrix_preconditioners(tmp_path, name, threshold):
    "λ1(P⁻¹H) through the map P^{-1/2} of K-FAC, SOAP, PSGD-Kron against their thresholds; Muon: λ1(H) alone"
    run = Run('digits', name, 0, 1, 256, track='every=3,samples=100')
    run_one(run, tmp_path, 'cpu')
    recs = json.loads((run.folder(tmp_path)/'dynamics.json').read_text())['records']
    assert len(recs) >= 2 and all(r['lambda1'] > 0 for r in recs)
    if threshold is None: assert all(r['pre_lambda1'] is None and r['threshold'] is None for r in recs)
    else:
        assert recs[0]['pre_lambda1'] is None  # before the first step there is no P
        assert all(r['pre_lambda1'] > 0 and r['pre_threshold'] == pytest.approx(threshold) for r in recs[1:])


def test_two_edge_drivers_compute_each_run_once(tmp_path):
    "Two identical `edge` commands at once: each step size's run is computed by one of them, and stored once"
    import subprocess, sys
    args = ['edge', '--dataset', 'digits', '--samples', '100', '--methods', 'gd', '--lrs', '0.1,0.2,0.3,0.4',
            '--steps', '10', '--every', '2', '--device', 'cpu', '--out', str(tmp_path/'edge')]
    cmd = [sys.executable, '-c', f'from secondorder_cnn.cli import main; main({args!r})']
    env = dict(__import__('os').environ, OMP_NUM_THREADS='1')
    ps = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in ps]
    assert [p.returncode for p in ps] == [0, 0], logs
    computed = [l for log in logs for l in log.splitlines() if ' steps, ' in l]
    assert sorted(l.split(':')[0] for l in computed) == [f'gd lr {v}' for v in ('0.1', '0.2', '0.3', '0.4')], logs
    assert len(list((tmp_path/'edge').rglob('dynamics.json'))) == 4 and not list((tmp_path/'edge').rglob('.*.lock'))


def test_edge_checks_every_output_before_computing(tmp_path, capsys):
    "A run's folder that cannot be written (a file where it goes): one line, before any run is computed"
    out = tmp_path/'edge'
    (out/'digits/gd').mkdir(parents=True)
    (out/'digits/gd/lr0.2').write_text('not a folder')
    err = fails(['edge', '--dataset', 'digits', '--samples', '100', '--methods', 'gd', '--lrs', '0.1,0.2',
                 '--steps', '5', '--device', 'cpu', '--out', out], capsys)
    assert "output folder" in err and "lr0.2' is not writable" in err, err
    assert not (out/'digits/gd/lr0.1').exists()
