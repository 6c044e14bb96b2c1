"Reading the original study's results files: nothing in them runs, bad files are one line, imports are ordinary runs"
import collections, io, json, os, pickle, sys, types
from pathlib import Path
import pytest, torch
from torch import nn
from secondorder_cnn.cli import main
from secondorder_cnn.data import mnist5k
from secondorder_cnn.experiments import curvature, report
from secondorder_cnn.model import LeNet5
from secondorder_cnn.original import (ALLOWED, CURVES, DATASET_NAMES, accuracy_on, import_original, pickle_globals,
                                      read_original)
from secondorder_cnn.runs import finished_runs, load_metrics
from conftest import fake_mnist, snapshot

ROOT = Path(__file__).parents[1]
ORIGINAL = next((d/'original-study-results' for d in (ROOT/'shared', ROOT.parent/'shared')
                 if (d/'original-study-results').is_dir()), None)
needs_original = pytest.mark.skipif(ORIGINAL is None, reason="the original study's results files are not here")
FMNIST = Path('/usr/share/datasets/fashion-mnist')


def original_bytes(results:dict) -> bytes:
    "`results` pickled as the original study did: protocol 4, its models of the class `src.model.LeNet5`"
    src, model = types.ModuleType('src'), types.ModuleType('src.model')
    src.model, model.LeNet5 = model, type('LeNet5', (LeNet5,), dict(__module__='src.model'))
    sys.modules.update({'src': src, 'src.model': model})
    try:
        for opts in results.values():
            for r in opts.values():
                if isinstance(r, dict) and isinstance(r.get('model'), LeNet5): r['model'].__class__ = model.LeNet5
        return pickle.dumps(results, protocol=4)
    finally: del sys.modules['src'], sys.modules['src.model']


def fake_results(datasets=('MNIST',), optimizers=('Adam', 'LBFGS'), epochs=2, seed=0) -> dict:
    "Results in the original's layout: random LeNet5s and made-up curves"
    torch.manual_seed(seed)
    curves = lambda: {k: [round(float(v), 4) for v in torch.rand(epochs)] for k in CURVES}
    return {ds: {opt: dict(curves(), model=LeNet5.for_dataset(DATASET_NAMES[ds])) for opt in optimizers}
            for ds in datasets}


class Payload:
    "Pickled, it calls `f(*args)` when loaded"
    def __init__(self, f, *args): self.f, self.args = f, args
    def __reduce__(self): return self.f, self.args


def cli(*args) -> tuple[int, str]:
    "Exit code and stderr of `secondorder-cnn *args`"
    import contextlib, io
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try: main([str(a) for a in args])
        except SystemExit as e: return e.code, err.getvalue()
    return 0, err.getvalue()


def test_a_file_in_the_original_format_round_trips(tmp_path, data_env, one_thread):
    fake = fake_results()
    data = original_bytes(fake)
    assert set(pickle_globals(data)) == {'.'.join(k) for k in ALLOWED}  # the globals of the real files
    f = tmp_path/'MNIST_results.dic'
    f.write_bytes(data)
    out = tmp_path/'results'
    assert cli('import-original', f, '--out', out) == (0, '')
    runs = finished_runs(out)
    assert [r.name for r in runs] == ['mnist/adam/seed12345', 'mnist/lbfgs/seed12345']
    for run, opt in zip(runs, ('Adam', 'LBFGS')):
        want = fake['MNIST'][opt]
        state = run.load_model('cpu').state_dict()
        assert all(torch.equal(state[k], v) for k, v in want['model'].state_dict().items())
        m = load_metrics(run.folder/'metrics.json')
        assert m['status'] == 'ok' and m['config']['bs'] == 1000 and m['config']['epochs'] == 2
        for ours, theirs in (('train_loss', 'training_losses'), ('test_loss', 'test_losses'),
                             ('train_acc', 'training_accuracies'), ('test_acc', 'test_accuracies')):
            assert [e[ours] for e in m['epochs']] == want[theirs]
        assert [e['seconds'] for e in m['epochs']] == [0.0, 0.0] and m['config']['timing'] == 'not recorded'
        config = json.loads((run.folder/'config.json').read_text())
        assert config['source']['file'] == 'MNIST_results.dic' and config['settings'] == m['config']['settings']
    # the other steps take them as they take runs trained here
    md = report(out, log=None)
    assert '| mnist | adam | 1 | 0 |' in md and (out/'results.csv').exists()
    fake_mnist(data_env/'MNIST'/'raw')
    cs = curvature(out, n=50, device='cpu', log=None, max_iter=5, max_hvp=6, slq_iter=5, slq_runs=1)
    assert len(cs) == 2 and all(c['n_samples'] == 50 for c in cs)
    # measured on other data, offline: recorded, and a result for those data only
    cs = curvature(out, n=50, device='cpu', log=None, data='mnist5k', max_iter=5, max_hvp=6, slq_iter=5, slq_runs=1)
    assert len(cs) == 2 and all(c['computed_from']['data'] == 'mnist5k' for c in cs)


def test_importing_again_skips_and_force_redoes(tmp_path):
    f = tmp_path/'MNIST_results.dic'
    f.write_bytes(original_bytes(fake_results()))
    out = tmp_path/'results'
    import_original([f], out, log=None)
    (out/'mnist/adam/seed12345/curvature.json').write_text('{}')
    before, logs = snapshot(out), []
    import_original([f], out, log=logs.append)
    assert snapshot(out) == before
    assert logs == [f'mnist/{o}/seed12345: imported already from MNIST_results.dic, skipped' for o in ('adam', 'lbfgs')]
    import_original([f], out, force=True, log=None)
    assert not (out/'mnist/adam/seed12345/curvature.json').exists()  # a redone import keeps no old result
    # another file for the same runs replaces them only with --force
    g = tmp_path/'other.dic'
    g.write_bytes(original_bytes(fake_results(seed=1)))
    code, err = cli('import-original', g, '--out', out)
    assert code == 2 and 'holds a run imported from another file: rerun with --force' in err and err.count('\n') == 1
    assert cli('import-original', g, '--out', out, '--force') == (0, '')
    assert load_metrics(out/'mnist/adam/seed12345/metrics.json')['config']['source']['file'] == 'other.dic'


def test_a_folder_of_a_trained_run_is_not_replaced(tmp_path):
    f = tmp_path/'MNIST_results.dic'
    f.write_bytes(original_bytes(fake_results()))
    out = tmp_path/'results'
    import_original(f, out, log=None)
    m = out/'mnist/adam/seed12345/metrics.json'
    metrics = json.loads(m.read_text())
    del metrics['config']['source']
    m.write_text(json.dumps(metrics))
    with pytest.raises(ValueError, match='holds a run not imported: rerun with --force'): import_original(f, out)


def bad_files(marker:Path) -> dict:
    "name: (the bytes of a file that is not a results file of the original study, what its error says)"
    good = original_bytes(fake_results())
    r = fake_results()
    del r['MNIST']['Adam']['model']
    hooked = fake_results()
    hooked['MNIST']['Adam']['model'] = Payload(torch._utils._rebuild_parameter, torch.zeros(2), False,
                                               collections.OrderedDict(h=collections.OrderedDict))
    tanh = fake_results()
    tanh['MNIST']['Adam']['model'].feature_extractor[1] = nn.Tanh()
    run_it = f'touch {marker}'
    laughs = [1] * 10
    for _ in range(30): laughs = [laughs] * 10  # 10³¹ references in a few hundred bytes
    deep = b'\x80\x02' + b']' * 200_000 + b'a' * 199_999 + b'.'  # a list 200,000 levels deep, built by hand
    zipped, pid = io.BytesIO(), io.BytesIO()
    torch.save({'MNIST': torch.zeros(2)}, zipped)
    class Refers(pickle.Pickler):
        def persistent_id(self, o): return 'elsewhere' if o == 'ref' else None
    Refers(pid, protocol=2).dump({'MNIST': 'ref'})
    return {
        'torch zip': (zipped.getvalue(), 'is a zip archive (as torch.save writes), not a results file'),
        'persistent id': (pid.getvalue(), 'it refers to an object outside the pickle (a persistent ID)'),
        'deep': (deep, 'nests deeper than 32 levels: not a results file of the original study'),
        'billion laughs': (pickle.dumps(laughs), 'holds more than 1,000,000 objects (counted once per reference)'),
        'payload': (pickle.dumps({'MNIST': {'Adam': Payload(os.system, run_it)}}),
                    f'names the global {os.system.__module__}.system, which no results file of the original study'),
        'eval': (pickle.dumps({'MNIST': Payload(eval, f"__import__('os').system({run_it!r})")}),
                 'names the global builtins.eval'),
        'nested payload': (pickle.dumps({'MNIST': Payload(torch.storage._load_from_bytes,
                                                          pickle.dumps(Payload(os.system, run_it)))}),
                           'a storage in it is not one that torch reads without running code'),
        'hooks': (pickle.dumps(hooked), 'a parameter in it comes with backward hooks, which are code: refused'),
        'unknown layer': (original_bytes(tanh), 'names the global torch.nn.modules.activation.Tanh'),
        'truncated': (good[:len(good) // 2], 'is truncated: its pickle ends early'),
        'empty': (b'', 'is empty'),
        'not a pickle': (b'epoch,train_loss\n1,0.3\n', 'is not a pickle ('),
        'state_dict': (pickle.dumps(LeNet5().state_dict()), "unknown dataset 'feature_extractor.0.weight'"),
        'wrong keys': (original_bytes(r), "MNIST/Adam holds ['test_accuracies', 'test_losses', 'training_accuracies',"),
    }


@pytest.mark.parametrize('case', list(bad_files(Path('m'))))
def test_a_bad_file_is_one_line_runs_nothing_and_writes_nothing(tmp_path, case):
    marker = tmp_path/'marker'
    data, msg = bad_files(marker)[case]
    good, bad = tmp_path/'MNIST_results.dic', tmp_path/'bad.dic'
    good.write_bytes(original_bytes(fake_results()))
    bad.write_bytes(data)
    code, err = cli('import-original', good, bad, '--out', tmp_path/'results')
    assert code == 2 and err.startswith('secondorder-cnn: error: ') and err.count('\n') == 1, err
    assert str(bad) in err and msg in err, err
    assert not marker.exists()
    assert not (tmp_path/'results').exists()  # the good file is not imported either
    with pytest.raises(ValueError, match='^' + str(bad)): read_original(bad)


@pytest.mark.parametrize('what', ['fifo', 'device', 'folder', 'empty path', 'missing', 'too large'])
def test_a_path_that_is_not_a_results_file_is_one_line_and_never_hangs(tmp_path, what):
    f = {'device': Path('/dev/zero'), 'folder': tmp_path, 'empty path': ''}.get(what, tmp_path/'x.dic')
    if what == 'fifo': os.mkfifo(f)
    if what == 'too large':
        with open(f, 'wb') as fh: fh.truncate(65 * 2**20)  # sparse: nothing of it is read
    code, err = cli('import-original', f, '--out', tmp_path/'results')
    msg = {'missing': 'cannot read', 'too large': 'at most 67,108,864 are read', 'empty path': 'must be one or more paths'
           }.get(what, 'is not a regular file (a folder, a FIFO or a device)')
    assert code == 2 and err.count('\n') == 1 and msg in err, err
    assert not (tmp_path/'results').exists()


def test_bad_arguments():
    for files in ([], 3, ['a.dic', 3]):
        with pytest.raises(ValueError, match="must be one or more paths of the original study's results files"):
            import_original(files)
    with pytest.raises(ValueError, match="force 'yes' must be True or False"): import_original('a.dic', force='yes')


@needs_original
def test_the_real_files_name_only_the_allowed_globals():
    for f in sorted(ORIGINAL.glob('*_results.dic')):
        assert set(pickle_globals(f.read_bytes())) == {'.'.join(k) for k in ALLOWED}, f


@needs_original
@pytest.mark.skipif(not (FMNIST/'t10k-images-idx3-ubyte.gz').exists(), reason="needs Debian's dataset-fashion-mnist")
def test_the_real_fashion_mnist_models_score_what_they_recorded(tmp_path, one_thread):
    runs = import_original(ORIGINAL/'Fashion_MNIST_results.dic', tmp_path, log=None)
    accs = {run.config['optimizer']: 100 * accuracy_on(run, device='cpu') for run in runs}
    want = dict(adam=84.96, lbfgs=75.49, adahessian=80.74, apollo=85.63)
    assert accs.keys() == want.keys() and all(abs(accs[k] - want[k]) < 0.005 for k in want), accs
    assert all(abs(100 * run.metrics['epochs'][-1]['test_acc'] - want[run.config['optimizer']]) < 1e-9 for run in runs)


@needs_original
def test_the_real_mnist_models_on_mlxtends_digits(tmp_path, one_thread):
    runs = import_original(ORIGINAL/'MNIST_results.dic', tmp_path, log=None)
    accs = {run.config['optimizer']: 100 * accuracy_on(run, 'mnist5k', 'cpu') for run in runs}
    want = dict(adam=98.28, lbfgs=94.88, adahessian=99.12, apollo=98.76)
    assert accs.keys() == want.keys() and all(abs(accs[k] - want[k]) < 0.005 for k in want), accs
    assert len(mnist5k()[1]) == 5000


@needs_original
def test_the_real_cifar_file_reads(tmp_path):
    got = read_original(ORIGINAL/'CIFAR_results.dic')
    assert list(got) == [('CIFAR', o) for o in ('Adam', 'LBFGS', 'AdaHessian', 'Apollo')]
    assert all(len(r['test_accuracies']) == 50 for r in got.values())
    assert [round(100 * r['test_accuracies'][-1], 2) for r in got.values()] == [56.41, 49.62, 50.33, 53.39]


@needs_original
def test_the_committed_measurements_are_of_the_original_weights(tmp_path, one_thread):
    "The original's weights stay out of the repository: its measurements there name, by SHA-256, what importing gives"
    stored = {f: json.loads(f.read_text())['computed_from']['model_sha256']
              for f in sorted((ROOT/'results'/'original').glob('*/*/seed*/*.json'))
              if f.name not in ('config.json', 'metrics.json')}
    assert len(stored) >= 16, sorted(stored)  # curvature and landscape of the Fashion-MNIST and MNIST models
    files = sorted(ORIGINAL.glob('*_results.dic'))
    runs = {run.name: run for f in files for run in import_original(f, tmp_path, log=None)}
    for f, sha in stored.items(): assert runs['/'.join(f.parts[-4:-1])].model_sha256() == sha, f
