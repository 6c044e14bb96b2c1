"Bad input through the command line: one line on stderr, exit code 2, and not one file changed"
import json, os, pickle, shutil
from pathlib import Path
import pytest, torch
from secondorder_cnn.cli import main
from conftest import snapshot

pytestmark = pytest.mark.usefixtures('one_thread')
SHORT = ['--epochs', '1', '--bs', '256', '--device', 'cpu']
SMALL_CURVATURE = ['--samples', '100', '--max-iter', '8', '--max-hvp', '9', '--slq-iter', '5', '--slq-runs', '1']
SMALL_LANDSCAPE = ['--samples', '100', '--resolution', '3']


@pytest.fixture(scope='module')
def results(tmp_path_factory):
    "Two one-epoch digits runs with their curvature and landscapes, made by the command"
    out = tmp_path_factory.mktemp('bad')/'results'
    torch.set_num_threads(1)
    main(['run', '--optimizers', 'adam,sgd', *SHORT, '--out', str(out)])
    main(['curvature', '--out', str(out), '--device', 'cpu', *SMALL_CURVATURE])
    main(['landscape', '--out', str(out), '--device', 'cpu', *SMALL_LANDSCAPE])
    main(['report', '--out', str(out)])
    return out


def fails(args:list, capsys) -> str:
    "The one line `secondorder-cnn args` writes to stderr, after checking it exits with 2 and prints nothing else"
    capsys.readouterr()
    with pytest.raises(SystemExit) as e: main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert e.value.code == 2, (args, e.value.code, err)
    assert err.startswith('secondorder-cnn: error: ') and err.count('\n') == 1 and 'Traceback' not in err, err
    return err


CASES = [  # arguments after --out <results>, and what the error must say
    (['run', '--preset', 'huge'], "preset 'huge' is not allowed; allowed: 'quick', 'paper', 'fmnist'"),
    (['run', '--datasets', 'digits,imagenet'], "unknown dataset 'imagenet'"),
    (['run', '--datasets', ','], 'the grid is empty'),
    (['run', '--optimizers', 'adam,rmsprop'], "optimizer 'rmsprop' is not allowed"),
    (['run', '--optimizers', 'Adam'], "optimizer 'Adam' is not allowed"),
    (['run', '--epochs', '0'], 'epochs 0 must be an integer >= 1'),
    (['run', '--epochs', '-3'], 'epochs -3 must be an integer >= 1'),
    (['run', '--epochs', 'ten'], "argument --epochs: invalid int value: 'ten'"),
    (['run', '--epochs', '1.5'], "argument --epochs: invalid int value: '1.5'"),
    (['run', '--bs', '0'], 'bs 0 must be an integer >= 1'),
    (['run', '--bs', '-64'], 'bs -64 must be an integer >= 1'),
    (['run', '--bs', '2e3'], "argument --bs: invalid int value: '2e3'"),
    (['run', '--lr', 'fast'], "lr 'fast' must be a finite number > 0"),
    (['run', '--lr', 'inf'], "lr 'inf' must be a finite number > 0"),
    (['run', '--lr', 'nan'], "lr 'nan' must be a finite number > 0"),
    (['run', '--lr', '-0.1'], "lr '-0.1' must be a finite number > 0"),
    (['run', '--lr', '0'], "lr '0' must be a finite number > 0"),
    (['run', '--lr', '1e39'], "lr '1e39' must be at most 3.4e38, the largest float32"),
    (['run', '--seeds', '0,one'], "seed 'one' must be an integer >= 0"),
    (['run', '--seeds', '-1'], "seed '-1' must be an integer >= 0"),
    (['run', '--seeds', '1.5'], "seed '1.5' must be an integer >= 0"),
    (['run', '--seeds', '4294967296'], "seed '4294967296' must be at most 4294967295"),
    (['run', '--seeds', ','], 'the grid is empty'),
    (['run', '--device', 'gpu0'], "unknown device 'gpu0'"),
    (['run', '--device', 'meta'], "'meta'"),
    (['run', '--optimiser', 'adam'], 'unrecognized arguments: --optimiser adam'),
    (['run', '--optimizers', 'adam', *SHORT, '--lr', '0.01'],
     'holds a finished run with another configuration (settings.lr: 0.001 there, 0.01 asked)'),
    (['run', '--optimizers', 'adam', '--epochs', '2', '--bs', '256'], '(epochs: 1 there, 2 asked)'),
    (['curvature', '--optimizers', 'adamw'], "optimizer 'adamw' is not allowed"),
    (['curvature', '--datasets', 'cifar'], "unknown dataset 'cifar'"),
    (['curvature', '--samples', '0'], 'samples 0 must be an integer >= 1'),
    (['curvature', '--samples', 'all'], "argument --samples: invalid int value: 'all'"),
    (['curvature', '--max-hvp', '1'], '--max-hvp 1 must be an integer >= 3'),
    (['curvature', '--max-hvp', '10000000'], '--max-hvp 10000000 must be at most 3000'),
    (['curvature', '--max-iter', '0'], '--max-iter 0 must be an integer >= 1'),
    (['curvature', '--max-iter', '100000'], '--max-iter 100000 must be at most 1000'),
    (['curvature', '--slq-iter', '5000'], '--slq-iter 5000 must be at most 1000'),
    (['curvature', '--slq-runs', '0'], '--slq-runs 0 must be an integer >= 1'),
    (['curvature', '--seeds', '7'], 'no finished run in'),
    (['curvature', '--seeds', 'x'], "seed 'x' must be an integer >= 0"),
    (['curvature', '--device', 'gpu0'], "unknown device 'gpu0'"),
    (['curvature', '--data', 'mnist6k'], "unknown dataset 'mnist6k'"),
    (['run', '--workers', '0'], 'workers 0 must be an integer >= 1'),
    (['run', '--workers', '2', '--cpus-per-task', '3'], 'cpus_per_task 3 is more than the 2 CPUs of the local cluster'),
    (['curvature', '--workers', '-1'], 'workers -1 must be an integer >= 1'),
    (['curvature', '--address', 'nowhere'], "address 'nowhere' must be auto, HOST:PORT or ray://HOST:PORT"),
    (['landscape', '--gpus-per-task', '1.5', '--workers', '2'], 'gpus_per_task 1.5 must be at most 1'),
    (['landscape', '--range', '0.5,-0.5'], "range '0.5,-0.5' (0.5, -0.5) must be finite and increasing"),
    (['landscape', '--range', 'nan,1'], 'must be finite and increasing'),
    (['landscape', '--range', 'a,b'], "range 'a,b' must be 'lo,hi' or one number r for -r,r"),
    (['landscape', '--range', '1,2,3'], "range '1,2,3' must be 'lo,hi'"),
    (['landscape', '--range=-1,1e308'], "range '-1,1e308' (-1.0, 1e+308) must lie within [-100, 100]"),
    (['landscape', '--range', '1e3'], 'must lie within [-100, 100]'),
    (['landscape', '--resolution', '1'], 'resolution 1 must be an integer >= 2'),
    (['landscape', '--resolution', '100000'], 'resolution 100000 must be at most 501'),
    (['landscape', '--samples', '0'], 'samples 0 must be an integer >= 1'),
    (['landscape', '--seed', '-1'], 'seed -1 must be an integer >= 0'),
    (['landscape', '--seed', '99999999999'], 'seed 99999999999 must be at most 4294967295'),
    (['landscape', '--datasets', 'imagenet'], "unknown dataset 'imagenet'"),
    (['landscape', '--optimizers', 'rmsprop'], "optimizer 'rmsprop' is not allowed"),
    (['landscape', '--data', 'svhn'], "unknown dataset 'svhn'"),
    (['layers', '--max-hvp', '1'], '--max-hvp 1 must be an integer >= 3'),
    (['layers', '--max-iter', '0'], '--max-iter 0 must be an integer >= 1'),
    (['layers', '--samples', '0'], 'samples 0 must be an integer >= 1'),
    (['layers', '--optimizers', 'adamw'], "optimizer 'adamw' is not allowed"),
    (['layers', '--data', 'svhn'], "unknown dataset 'svhn'"),
    (['report', '--original', 'nowhere'], "no run in 'nowhere': import them with `secondorder-cnn import-original`"),
    (['report', '--optimizers', 'adam'], 'unrecognized arguments: --optimizers adam'),
    (['train'], "invalid choice: 'train'"),
]


@pytest.mark.parametrize('args, msg', CASES, ids=[' '.join(a) for a, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(results, capsys, args, msg):
    before = snapshot(results)
    err = fails([*args, '--out', results], capsys)
    assert msg in err, err
    assert snapshot(results) == before


@pytest.mark.parametrize('where', ['afile', 'afile/sub', 'nothing'])
@pytest.mark.parametrize('cmd', ['run', 'curvature', 'landscape', 'report'])
def test_unusable_output_folders(tmp_path, capsys, where, cmd):
    if (cmd, where) == ('run', 'nothing'): pytest.skip('a new folder is where run trains')
    (tmp_path/'afile').write_text('x')
    before = snapshot(tmp_path)
    err = fails([cmd, *(['--optimizers', 'adam', *SHORT] if cmd == 'run' else []), '--out', tmp_path/where], capsys)
    assert 'is not writable' in err or f"no results in '{tmp_path/where}'" in err, err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize('cmd', ['run', 'curvature', 'landscape', 'report', 'tune', 'edge', 'layers'])
def test_an_empty_output_folder_is_refused(tmp_path, capsys, monkeypatch, cmd):
    monkeypatch.chdir(tmp_path)
    err = fails([cmd, '--out', ''], capsys)
    assert "folder '' must be the path of a folder ('.' for this one)" in err, err
    assert list(tmp_path.iterdir()) == []


def test_an_output_folder_inside_a_run_is_refused(results, capsys):
    before = snapshot(results)
    inside = results/'digits/adam/seed0'
    for where in (inside, inside/'more'):
        err = fails(['run', '--optimizers', 'adam', *SHORT, '--out', where], capsys)
        assert f"is inside the folder of the run '{inside}'" in err, err
    assert snapshot(results) == before


def test_run_force_checks_every_folder_before_training(copy, capsys):
    "With one run's folder unusable (a file where it should be), `run --force` retrains nothing and changes nothing"
    blocked = copy/'digits/sgd/seed0'
    shutil.rmtree(blocked)
    blocked.write_text('not a folder')
    before = snapshot(copy)
    err = fails(['run', '--optimizers', 'adam,sgd', *SHORT, '--out', copy, '--force'], capsys)
    assert f"output folder '{blocked}' is not writable" in err, err
    assert snapshot(copy) == before


@pytest.fixture
def copy(results, tmp_path):
    "A copy of the results to spoil"
    out = tmp_path/'copy'
    shutil.copytree(results, out)
    return out


class Payload:
    "A pickle that runs a command when loaded"
    def __init__(self, marker:Path): self.marker = marker
    def __reduce__(self): return (os.system, (f'touch {self.marker}',))


def spoil_model(f:Path, how:str):
    good = torch.load(f, weights_only=True)
    if how == 'empty': f.write_bytes(b'')
    elif how == 'random': f.write_bytes(os.urandom(4096))
    elif how == 'text': f.write_text('model')
    elif how == 'list': torch.save([1, 2, 3], f)
    elif how == 'shapes': torch.save({k: v[..., :1] for k, v in good.items()}, f)
    elif how == 'keys': torch.save({'w' + k: v for k, v in good.items()}, f)
    elif how == 'nan': torch.save({k: v * float('nan') for k, v in good.items()}, f)
    elif how == 'inf': torch.save({k: v + float('inf') for k, v in good.items()}, f)
    elif how == 'payload':
        with open(f, 'wb') as o: pickle.dump(Payload(f.parent/'PWNED'), o)
    elif how == 'missing': f.unlink()


MODELS = [('empty', 'is not a file of weights'), ('random', 'is not a file of weights'), ('text', 'is not a file of weights'),
          ('list', 'holds no state_dict of tensors'), ('shapes', 'does not hold the weights of this LeNet5'),
          ('keys', 'does not hold the weights of this LeNet5'), ('nan', 'holds non-finite weights'),
          ('inf', 'holds non-finite weights'), ('payload', 'is not a file of weights'), ('missing', 'has no model.pt')]


@pytest.mark.filterwarnings('ignore:Detected pickle protocol')
@pytest.mark.parametrize('how, msg', MODELS, ids=[h for h, _ in MODELS])
def test_a_spoilt_model_is_named_and_nothing_is_written(copy, capsys, how, msg):
    f = copy/'digits/sgd/seed0/model.pt'
    spoil_model(f, how)
    before = snapshot(copy)
    for args in (['curvature', '--force', *SMALL_CURVATURE], ['landscape', '--force', *SMALL_LANDSCAPE]):
        err = fails([*args, '--out', copy, '--device', 'cpu'], capsys)
        assert msg in err and 'sgd/seed0' in err and 'weights_only=False' not in err, err
        assert snapshot(copy) == before
    assert not (f.parent/'PWNED').exists()


@pytest.mark.parametrize('name, args', [('metrics.json', ['report']), ('metrics.json', ['curvature']),
                                        ('metrics.json', ['run', '--optimizers', 'adam', *SHORT]),
                                        ('curvature.json', ['curvature']), ('landscape.json', ['landscape'])])
def test_a_corrupt_result_is_named_and_nothing_is_written(copy, capsys, name, args):
    f = copy/'digits/adam/seed0'/name
    f.write_text('{"status": "ok", "loss": [')
    before = snapshot(copy)
    assert f"{f} is corrupt: delete it, or rerun with --force" in fails([*args, '--out', copy], capsys)
    assert snapshot(copy) == before


EDITS = [  # a measurement edited by hand, valid JSON, the SHA-256 of the weights it records still theirs
    ('curvature.json', dict(top_eigenvalues=[]), 'top_eigenvalues is []: numbers expected'),
    ('curvature.json', dict(top_eigenvalues=[1.0, 'x']), 'top_eigenvalues is [1.0, \'x\']: numbers expected'),
    ('curvature.json', dict(trace='x'), "trace is 'x': number expected"),
    ('curvature.json', dict(trace=None), 'trace is None: number expected'),
    ('curvature.json', dict(computed_from='x'), "computed_from is 'x': record expected"),
    ('curvature.json', dict(computed_from={}), 'computed_from is {}: record expected'),
    ('curvature.json', dict(esd=None), 'esd is None: dict expected'),
    ('landscape.json', dict(loss=None), 'it lacks loss'), ('landscape.json', dict(loss=[[1.0], 'x']), 'loss is'),
    ('landscape.json', dict(alphas=[True]), 'alphas is [True]: numbers expected')]

@pytest.mark.parametrize('name, edit, msg', EDITS)
def test_a_hand_edited_measurement_is_named_and_nothing_is_written(copy, capsys, name, edit, msg):
    f = copy/'digits/adam/seed0'/name
    r = json.loads(f.read_text())
    r = {k: v for k, v in r.items() if k not in edit} if msg == 'it lacks loss' else r | edit
    f.write_text(json.dumps(r))
    before = snapshot(copy)
    for args in ([['report'], ['curvature', *SMALL_CURVATURE]] if 'curv' in name else [['landscape', *SMALL_LANDSCAPE]]):
        err = fails([*args, '--out', copy], capsys)
        assert f"{f} is corrupt (" in err and msg in err and 'rerun with --force' in err, err
        assert snapshot(copy) == before


def test_report_checks_every_output_before_writing_any(copy, capsys):
    (copy/'results.csv').unlink()
    (copy/'results.csv').mkdir()
    before = snapshot(copy)
    assert f"cannot write '{copy/'results.csv'}': it is a folder" in fails(['report', '--out', copy], capsys)
    assert snapshot(copy) == before


def test_landscape_checks_its_pages_before_measuring(copy, capsys):
    page = copy/'digits/sgd/seed0/landscape.html'
    page.unlink()
    page.mkdir()
    before = snapshot(copy)
    assert "it is a folder" in fails(['landscape', '--out', copy, '--force', *SMALL_LANDSCAPE], capsys)
    assert snapshot(copy) == before


@pytest.mark.parametrize('content', [
    '{"status": "ok"}', '{"status": "finished", "config": {}, "epochs": []}', '[1, 2]', '"ok"', 'null',
    '{"status": "ok", "config": {"dataset": "digits", "optimizer": "adam", "seed": 0, "epochs": 1, "bs": 256, '
    '"settings": {}}, "epochs": [{}]}',
    'other run'])
def test_metrics_of_the_wrong_shape_are_corrupt(copy, capsys, content):
    f = copy/'digits/adam/seed0/metrics.json'
    if content == 'other run': f.write_text((copy/'digits/sgd/seed0/metrics.json').read_text())
    else: f.write_text(content)
    before = snapshot(copy)
    for args in (['report'], ['curvature'], ['landscape'], ['run', '--optimizers', 'adam', *SHORT]):
        assert f"{f} is corrupt: delete it, or rerun with --force" in fails([*args, '--out', copy], capsys)
    assert snapshot(copy) == before


def test_report_original_takes_imported_runs_alone(results, capsys):
    "Runs trained here, given as the original study's, are refused rather than labelled '(original study)'"
    before = snapshot(results)
    err = fails(['report', '--out', results, '--original', results], capsys)
    assert "holds runs not imported from the original study (digits/adam/seed0 and 1 more)" in err, err
    assert snapshot(results) == before
