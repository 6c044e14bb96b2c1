import json, os, signal, subprocess, sys, time
from pathlib import Path
import pytest, torch
from torchvision.datasets import MNIST
from secondorder_cnn.cli import main
from secondorder_cnn.experiments import plan
from secondorder_cnn.model import LeNet5
from conftest import fake_cifar, fake_mnist, snapshot

CMD = [sys.executable, '-c', 'from secondorder_cnn.cli import main; main()']
SHORT = ['--epochs', '1', '--bs', '256', '--device', 'cpu']
pytestmark = pytest.mark.usefixtures('one_thread')


def cli(*args, **kw):
    "`secondorder-cnn args` in a new process (the worktree's code, whatever the installed entry point says)"
    return subprocess.run([*CMD, *map(str, args)], capture_output=True, text=True, timeout=300, **kw)


def metrics(d:Path) -> dict:
    "Metrics of every run under `d`, wall times left out"
    out = {}
    for f in sorted(d.glob('*/*/seed*/metrics.json')):
        m = json.loads(f.read_text())
        m['epochs'] = [{k: v for k, v in e.items() if k != 'seconds'} for e in m['epochs']]
        out[str(f.parent.relative_to(d))] = m
    return out


def models(d:Path) -> dict:
    return {str(f.parent.relative_to(d)): torch.load(f, weights_only=True) for f in sorted(d.glob('*/*/seed*/model.pt'))}


def same_models(a:dict, b:dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k][n], b[k][n]) for k in a for n in a[k])


def test_cli_end_to_end_on_digits(tmp_path):
    out = tmp_path/'results'
    r = cli('run', '--optimizers', 'adam,sgd', *SHORT, '--out', out)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].startswith('digits/adam/seed0: test acc ')
    assert '| digits | adam | 1 | 0 |' in r.stdout and '| digits | sgd | 1 | 0 |' in r.stdout
    for opt in ('adam', 'sgd'):
        d = out/'digits'/opt/'seed0'
        assert sorted(p.name for p in d.iterdir()) == ['config.json', 'metrics.json', 'model.pt']
        m = json.loads((d/'metrics.json').read_text())
        assert (m['status'], len(m['epochs']), m['n_train'], m['n_test']) == ('ok', 1, 1437, 360)
        assert set(m['epochs'][0]) == {'epoch', 'train_loss', 'train_acc', 'test_loss', 'test_acc', 'seconds', 'n_loss_evals', 'n_hvp'}
        assert json.loads((d/'config.json').read_text())['settings']['lr'] == (1e-3 if opt == 'adam' else 0.01)
        LeNet5().load_state_dict(torch.load(d/'model.pt', weights_only=True))
    main(['curvature', '--out', str(out), '--device', 'cpu', '--samples', '200', '--max-iter', '10', '--max-hvp', '12',
          '--slq-iter', '8', '--slq-runs', '1'])
    c = json.loads((out/'digits/adam/seed0/curvature.json').read_text())
    assert len(c['top_eigenvalues']) == 5 and c['n_samples'] == 200
    assert {'smallest_eigenvalue', 'trace', 'trace_stderr', 'esd'} <= set(c) and {'grid', 'density', 'nodes', 'weights'} <= set(c['esd'])
    r = cli('report', '--out', out)
    assert r.returncode == 0, r.stderr
    head = r.stdout.splitlines()[0]
    assert head.startswith('| dataset | optimizer | runs | diverged | final test acc % |') and 'λ1' in head and 'trace' in head
    assert f"{c['top_eigenvalues'][0]:.4g}" in r.stdout
    for f in ('TrainLossAcc.png', 'TestLossAcc.png', 'results.csv', 'paper.csv'): assert (out/f).stat().st_size > 0


def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path):
    grid = ['--optimizers', 'adam,sgd,sophiah', '--seeds', '0,1', *SHORT]
    ref, out = tmp_path/'ref', tmp_path/'out'
    main(['run', *grid, '--out', str(ref)])
    p = subprocess.Popen([*CMD, 'run', *grid, '--out', str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first, deadline = out/'digits/adam/seed0/metrics.json', time.monotonic() + 120
    while not first.exists() and p.poll() is None and time.monotonic() < deadline: time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    p.wait()
    done = {str(f.parent.relative_to(out)): f.stat().st_mtime_ns for f in out.glob('*/*/seed*/metrics.json')}
    assert 1 <= len(done) < 6, done  # killed mid-grid
    r = cli('run', *grid, '--out', out)
    assert r.returncode == 0, r.stderr
    assert sum('finished, skipped' in l for l in r.stdout.splitlines()) == len(done)
    assert {k: (out/k/'metrics.json').stat().st_mtime_ns for k in done} == done
    assert metrics(out) == metrics(ref) and len(metrics(ref)) == 6
    assert same_models(models(out), models(ref))
    assert not list(out.rglob('*.tmp'))


def test_same_seed_same_metrics(tmp_path):
    args = ['run', '--optimizers', 'sophiah', *SHORT]  # its probes are drawn from the seed too
    for d, seed in (('a', 3), ('b', 3), ('c', 4)): main([*args, '--seeds', str(seed), '--out', str(tmp_path/d)])
    a, b, c = (metrics(tmp_path/d) for d in 'abc')
    assert a == b and same_models(models(tmp_path/'a'), models(tmp_path/'b'))
    assert a['digits/sophiah/seed3']['epochs'] != c['digits/sophiah/seed4']['epochs']


def test_diverging_run_is_recorded_and_the_grid_goes_on(tmp_path, capsys):
    out = tmp_path/'res'
    main(['run', '--optimizers', 'sgd,adam', '--lr', '1e30', '--seeds', '0,1', *SHORT, '--out', str(out)])
    ms = metrics(out)
    assert len(ms) == 4 and all((m['status'], m['diverged_epoch'], m['epochs']) == ('diverged', 1, []) for m in ms.values())
    assert all((out/k/'model.pt').exists() for k in ms)
    stdout = capsys.readouterr().out
    assert 'digits/adam/seed1: diverged in epoch 1' in stdout and '| digits | sgd | 2 | 2 |' in stdout
    main(['curvature', '--out', str(out)])  # nothing to measure, and no error
    assert not list(out.glob('**/curvature.json'))


@pytest.mark.parametrize('args, msg', [
    (['run', '--preset', 'huge'], "preset 'huge' is not allowed; allowed: 'quick', 'paper', 'fmnist'"),
    (['run', '--datasets', 'digits,imagenet'], "unknown dataset 'imagenet'; allowed: mnist, fashion_mnist, cifar10, digits, mnist5k"),
    (['run', '--optimizers', 'adam,rmsprop'], "optimizer 'rmsprop' is not allowed; allowed: 'adam', 'sgd', 'lbfgs', 'adahessian', 'apollo', 'apollo-2023', 'sophiah', 'muon', 'kfac', 'shampoo', 'soap', 'kron'"),
    (['run', '--epochs', '0'], 'epochs 0 must be an integer >= 1'),
    (['run', '--epochs', 'ten'], "argument --epochs: invalid int value: 'ten'"),
    (['run', '--bs', '0'], 'bs 0 must be an integer >= 1'),
    (['run', '--bs', '-64'], 'bs -64 must be an integer >= 1'),
    (['run', '--lr', 'fast'], "lr 'fast' must be a finite number > 0"),
    (['run', '--lr', 'inf'], "lr 'inf' must be a finite number > 0"),
    (['run', '--lr', 'nan'], "lr 'nan' must be a finite number > 0"),
    (['run', '--lr', '-0.1'], "lr '-0.1' must be a finite number > 0"),
    (['run', '--seeds', '0,one'], "seed 'one' must be an integer >= 0"),
    (['run', '--device', 'gpu0'], "unknown device 'gpu0'; allowed: cpu, cuda, cuda:<index>, mps"),
    (['curvature', '--optimizers', 'adamw'], "optimizer 'adamw' is not allowed; allowed: 'adam', 'sgd', 'lbfgs', 'adahessian', 'apollo', 'apollo-2023', 'sophiah', 'muon', 'kfac', 'shampoo', 'soap', 'kron'"),
    (['curvature', '--samples', '0'], 'samples 0 must be an integer >= 1'),
    (['report'], "no results in '{out}': train them first with `secondorder-cnn run`"),
])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(tmp_path, capsys, args, msg):
    out = tmp_path/'res'
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as e: main([*args, '--out', str(out)])
    assert e.value.code == 2
    assert capsys.readouterr().err == f"secondorder-cnn: error: {msg.format(out=out)}\n"
    assert snapshot(tmp_path) == before


def test_unknown_subcommand_and_the_exit_status_of_the_process(tmp_path, capsys):
    with pytest.raises(SystemExit) as e: main(['train'])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count('\n') == 1 and "invalid choice: 'train'" in err
    r = cli('run', '--preset', 'huge', cwd=tmp_path)
    assert (r.returncode, r.stdout, r.stderr) == (2, '', "secondorder-cnn: error: preset 'huge' is not allowed; allowed: 'quick', 'paper', 'fmnist'\n")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_folder(tmp_path, capsys):
    (tmp_path/'afile').write_text('x')
    before = snapshot(tmp_path)
    for out in (tmp_path/'afile', tmp_path/'afile'/'res'):
        with pytest.raises(SystemExit) as e: main(['run', '--optimizers', 'adam', *SHORT, '--out', str(out)])
        assert e.value.code == 2 and capsys.readouterr().err == f"secondorder-cnn: error: output folder '{out}' is not writable\n"
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason='root writes into read-only folders')
def test_read_only_output_folder(tmp_path, capsys):
    ro = tmp_path/'ro'
    ro.mkdir(); ro.chmod(0o500)
    try:
        with pytest.raises(SystemExit) as e: main(['run', '--optimizers', 'adam', *SHORT, '--out', str(ro/'res')])
        assert e.value.code == 2 and 'is not writable' in capsys.readouterr().err
        assert list(ro.iterdir()) == []
    finally: ro.chmod(0o700)


def test_corrupt_metrics_stop_everything_before_any_write(tmp_path, capsys):
    out = tmp_path/'res'
    main(['run', '--optimizers', 'adam', *SHORT, '--out', str(out)])
    f = out/'digits/adam/seed0/metrics.json'
    f.write_text('{"config": {"dataset": "dig')
    capsys.readouterr()
    before = snapshot(tmp_path)
    for args in (['run', '--optimizers', 'sgd,adam', *SHORT], ['curvature'], ['report']):
        with pytest.raises(SystemExit) as e: main([*args, '--out', str(out)])
        assert e.value.code == 2
        assert capsys.readouterr().err == f"secondorder-cnn: error: {f} is corrupt: delete it, or rerun with --force\n"
        assert snapshot(tmp_path) == before
    main(['run', '--optimizers', 'adam', *SHORT, '--out', str(out), '--force'])
    assert json.loads(f.read_text())['status'] == 'ok'


def test_finished_run_with_other_settings_is_not_overwritten(tmp_path, capsys):
    out = tmp_path/'res'
    main(['run', '--optimizers', 'adam', *SHORT, '--out', str(out)])
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as e: main(['run', '--optimizers', 'adam', *SHORT, '--lr', '0.01', '--out', str(out)])
    assert e.value.code == 2 and 'holds a finished run with another configuration' in capsys.readouterr().err
    assert snapshot(tmp_path) == before


def test_missing_dataset_is_one_line_and_writes_no_result(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(MNIST, 'mirrors', [(tmp_path/'offline').as_uri() + '/'])
    with pytest.raises(SystemExit) as e: main(['run', '--datasets', 'mnist', '--optimizers', 'adam', *SHORT, '--out', str(tmp_path/'res')])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith('secondorder-cnn: error: mnist: raw files not found in ') and err.count('\n') == 1
    assert not (tmp_path/'res').exists()


def test_paper_preset_on_files_in_the_original_formats(tmp_path, data_env, cifar_checksums, capsys):
    assert [(r.dataset, r.optimizer, r.epochs, r.bs, r.seed) for r in plan('paper')][::4] == [
        ('mnist', 'adam', 10, 1000, 12345), ('fashion_mnist', 'adam', 10, 1000, 12345), ('cifar10', 'adam', 50, 1000, 12345)]
    fake_mnist(data_env/'MNIST'/'raw', gz=True)
    files, _, _ = fake_cifar(data_env/'cifar-10-batches-py')
    cifar_checksums(files)
    out = tmp_path/'res'
    main(['run', '--preset', 'paper', '--datasets', 'mnist,cifar10', '--optimizers', 'adam', '--epochs', '1', '--device', 'cpu', '--out', str(out)])
    ms = metrics(out)
    assert list(ms) == ['cifar10/adam/seed12345', 'mnist/adam/seed12345']
    for k, (n_train, n_test) in (('mnist/adam/seed12345', (50, 20)), ('cifar10/adam/seed12345', (40, 8))):
        m = ms[k]
        assert (m['status'], m['n_train'], m['n_test'], m['config']['bs'], m['config']['epochs']) == ('ok', n_train, n_test, 1000, 1)
    main(['report', '--out', str(out)])
    stdout = capsys.readouterr().out
    assert '| mnist | adam | 98.16 |' in stdout and '| cifar10 | adam | 56.41 |' in stdout
