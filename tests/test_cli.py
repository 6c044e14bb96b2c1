import subprocess, sys
import pytest
from torchvision.datasets import MNIST
from secondorder_cnn.model import cli

DEMO = [sys.executable, '-c', 'from secondorder_cnn.model import cli; cli()']


def run(*args):
    return subprocess.run([*DEMO, *args], capture_output=True, text=True, timeout=300)


def test_demo_trains_and_reports():
    r = run('--epochs', '2', '--device', 'cpu')
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith('LeNet5 (61,706 parameters), Adam lr 0.001, digits: 1,437 train / 360 test')
    assert lines[-1].startswith('test accuracy: ') and lines[-1].endswith('%')
    assert float(lines[-1].split()[-1][:-1]) > 50


@pytest.mark.parametrize('args, msg', [
    (['--dataset', 'imagenet'], "unknown dataset 'imagenet'; allowed: mnist, fashion_mnist, cifar10, digits"),
    (['--epochs', '0'], 'epochs 0 must be at least 1'),
    (['--lr', '-0.1'], 'lr -0.1 must be positive'),
    (['--bs', '0'], 'batch size 0 must be a positive integer'),
    (['--device', 'gpu0'], "unknown device 'gpu0'; allowed: cpu, cuda, cuda:<index>, mps"),
    (['--epochs', 'ten'], "argument --epochs: invalid int value: 'ten'"),
    (['--optimiser', 'adam'], 'unrecognized arguments: --optimiser adam'),
])
def test_bad_input_is_one_line_and_exit_2(args, msg, capsys):
    with pytest.raises(SystemExit) as e: cli(args)
    assert e.value.code == 2
    assert capsys.readouterr().err == f'secondorder-cnn: error: {msg}\n'


def test_bad_input_exit_status_of_the_demo():
    r = run('--dataset', 'imagenet')
    assert (r.returncode, r.stdout) == (2, '')
    assert r.stderr.count('\n') == 1 and 'Traceback' not in r.stderr


def test_missing_dataset_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(MNIST, 'mirrors', [(tmp_path/'offline').as_uri() + '/'])
    with pytest.raises(SystemExit) as e: cli(['--dataset', 'mnist', '--root', str(tmp_path/'root')])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith('secondorder-cnn: error: mnist: raw files not found in ') and err.count('\n') == 1
