"`tune`: a search per optimizer on a validation split with Ray Tune, the best retrained as ordinary runs"
import json, os, pickle, signal, subprocess, sys
from pathlib import Path
import pytest
from secondorder_cnn import scale
from secondorder_cnn.cli import main
from conftest import free_port, snapshot

pytestmark = pytest.mark.usefixtures('one_thread')
TINY = ['tune', '--preset', 'quick', '--epochs', '2', '--bs', '128', '--device', 'cpu']


def test_tune_chooses_on_validation_retrains_and_reruns_nothing(ray, tmp_path, capsys, monkeypatch):
    out, loaded = tmp_path/'results', []
    load = scale.load_tensors
    monkeypatch.setattr(scale, 'load_tensors', lambda d, train=True: loaded.append(train) or load(d, train))
    args = [*TINY, '--optimizers', 'adam,sophiah', '--trials', '3', '--seeds', '0,1', '--workers', '2',
            '--out', str(out)]
    main(args)
    assert loaded == [True, True]  # the search read the training set alone, once per optimizer
    best = json.loads((out/'tune/digits/best.json').read_text())
    assert best['validation'] == dict(fraction=0.1, seed=0)
    for o, keys in (('adam', ['lr']), ('sophiah', ['gamma', 'lr'])):
        b = best['optimizers'][o]
        assert sorted(b['settings']) == keys and b['trials'] == 3 and 0 < b['valid_acc'] <= 1
        assert (b['n_train'], b['n_valid']) == (1293, 144)
        lo, hi = scale.SEARCH[o]['lr']
        assert lo <= b['settings']['lr'] <= hi
        for seed in (0, 1):
            m = json.loads((out/f'digits/{o}/seed{seed}/metrics.json').read_text())
            assert m['config']['tuned'] and m['n_train'] == 1437  # retrained on the full training set
            assert {k: m['config']['settings'][k] for k in keys} == b['settings']
            assert m['config'].get('overrides', {}) == {k: v for k, v in b['settings'].items() if k != 'lr'}
    log = capsys.readouterr().out
    assert log.count('a trial ended after') == 6 and '| digits | sophiah |' in log, log
    before = snapshot(out)
    main(args)
    log = capsys.readouterr().out
    assert snapshot(out) == before
    assert 'digits/adam: search finished, skipped' in log and 'ray:' not in log and 'a trial ended' not in log, log
    sophiah = best['optimizers']['sophiah']
    main([*args[:args.index('--optimizers')], '--optimizers', 'adam', '--trials', '2', '--seeds', '0', '--workers', '2',
          '--out', str(out), '--force'])
    best = json.loads((out/'tune/digits/best.json').read_text())
    assert best['optimizers']['adam']['trials'] == 2 and best['optimizers']['sophiah'] == sophiah  # the other kept


def test_the_validation_split_is_disjoint_from_what_trials_train_on():
    x, y = scale.load_tensors('digits', True)
    tr, va = scale.validation_split(y)
    assert not set(tr.tolist()) & set(va.tolist()) and len(tr) + len(va) == len(y)


class Planted:
    "A pickle that, when loaded, creates the file `marker`: what a stranger could leave in a shared results folder"
    def __init__(self, marker): self.marker = str(marker)
    def __reduce__(self): return (open, (self.marker, 'w'))


def test_a_killed_tune_starts_its_search_again_and_never_loads_tunes_pickles(ray, tmp_path, capsys):
    out, marker = tmp_path/'results', tmp_path/'code-ran'
    args = [*TINY, '--optimizers', 'adam', '--trials', '4', '--seeds', '0', '--workers', '1', '--out', str(out)]
    env = os.environ | dict(TUNE_GLOBAL_CHECKPOINT_S='0')  # Tune saves its state at every step
    p = subprocess.Popen([sys.executable, '-c', f'from secondorder_cnn.cli import main; main({args!r})'], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        ended = 0
        for line in p.stdout:
            ended += 'a trial ended after' in line
            if ended == 2: break
    finally:
        os.killpg(p.pid, signal.SIGKILL)  # the driver and the Ray cluster it started
        p.wait()
    assert ended == 2
    folder = out/'tune/digits/adam'
    assert (folder/'tuner.pkl').exists() and not (out/'tune/digits/best.json').exists()
    for f in [folder/'tuner.pkl', *folder.glob('*.pkl'), *folder.glob('_trial_*/*.pkl')]:
        f.write_bytes(pickle.dumps(Planted(marker)))
    main(args)
    log = capsys.readouterr().out
    assert not marker.exists()  # nothing of Tune's was unpickled
    assert "digits/adam: the search interrupted in" in log and "starts again" in log, log
    assert log.count('a trial ended after') == 4, log
    assert json.loads((out/'tune/digits/best.json').read_text())['optimizers']['adam']['trials'] == 4
    assert len(list(folder.glob('_trial_*'))) == 4
    assert (out/'digits/adam/seed0/metrics.json').exists()


def test_two_drivers_search_once(ray, tmp_path):
    "Two identical `tune` commands at once: each trial runs once, in one of them; both end with the same best"
    out = tmp_path/'results'
    args = [*TINY, '--optimizers', 'adam', '--trials', '3', '--seeds', '0', '--workers', '1', '--out', str(out)]
    cmd = [sys.executable, '-c', f'from secondorder_cnn.cli import main; main({args!r})']
    ps = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for _ in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in ps]
    assert [p.returncode for p in ps] == [0, 0], logs
    assert sum(l.count('a trial ended after') for l in logs) == 3, logs
    assert sum('search finished by another process' in l for l in logs) == 1, logs
    assert len(list((out/'tune/digits/adam').glob('_trial_*'))) == 3
    assert json.loads((out/'tune/digits/best.json').read_text())['optimizers']['adam']['trials'] == 3


@pytest.mark.parametrize('args,msg', [
    (['--trials', '0'], 'trials 0 must be an integer >= 1'),
    (['--optimizers', 'adamw'], "optimizer 'adamw' is not allowed"),
    (['--seed', '-1'], "seed -1 must be an integer >= 0"),
    (['--workers', '0'], 'workers 0 must be an integer >= 1'),
    (['--address', f'127.0.0.1:{free_port()}'], 'no Ray cluster answers at'),
    (['--address', 'nowhere'], "address 'nowhere' must be auto, HOST:PORT or ray://HOST:PORT"),
    (['--device', 'cuda:7'], "device 'cuda:7' asked for, but no CUDA GPU is available"),
    (['--device', 'tpu'], "unknown device 'tpu'")])
def test_bad_options_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, args, msg):
    out = tmp_path/'results'
    with pytest.raises(SystemExit) as e: main([*TINY, '--out', str(out), *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count('\n') == 1 and msg in err, err
    assert not out.exists()


def test_a_search_asked_with_other_settings_is_refused(tmp_path, capsys):
    folder = tmp_path/'results/tune/digits/adam'
    folder.mkdir(parents=True)
    (folder/'search.json').write_text(json.dumps(scale.search_config('digits', 'adam', 3, 2, 128, 0)))
    before = snapshot(tmp_path/'results')
    with pytest.raises(SystemExit) as e:
        main([*TINY, '--optimizers', 'adam', '--trials', '4', '--workers', '2', '--out', str(tmp_path/'results')])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count('\n') == 1
    assert 'holds a search with other settings (trials: 3 there, 4 asked)' in err, err
    assert snapshot(tmp_path/'results') == before


def test_without_ray_installed(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, 'ray', None)
    with pytest.raises(SystemExit) as e: main([*TINY, '--out', str(tmp_path/'r')])
    assert e.value.code == 2 and "need Ray: pip install 'secondorder-cnn[ray]'" in capsys.readouterr().err
    assert not (tmp_path/'r').exists()


def search_entry(o='adam', **kw) -> dict:
    e = dict(settings=dict(lr=0.01), valid_acc=0.9, valid_loss=0.3, trials=2, stopped_early=0, diverged=0,
             search=scale.search_config('digits', o, 2, 2, 128, 0))
    return e | kw

@pytest.mark.parametrize('optimizers', [
    [], 'x', {'adam': 'x'}, {'adam': {}}, {'adam': search_entry(settings={})}, {'adam': search_entry(settings='x')},
    {'adam': search_entry(settings=dict(lr=-1.))}, {'adam': search_entry(settings=dict(lr=True))},
    {'adam': search_entry(settings=dict(lr=0.1, momentum=0.9))},  # not a setting adam's search has
    {'adam': {k: v for k, v in search_entry().items() if k != 'trials'}}, {'adam': search_entry(trials=0)},
    {'adam': search_entry(valid_acc=1.5)}, {'adam': search_entry(search=None)}, {'adamw': search_entry()}])
def test_a_hand_edited_best_json_is_one_line_and_changes_nothing(tmp_path, capsys, optimizers):
    out = tmp_path/'results'
    (out/'tune/digits').mkdir(parents=True)
    (out/'tune/digits/best.json').write_text(json.dumps(dict(dataset='digits', optimizers=optimizers)))
    before = snapshot(out)
    with pytest.raises(SystemExit) as e: main([*TINY, '--optimizers', 'adam', '--out', str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count('\n') == 1 and 'best.json is corrupt' in err, err
    assert snapshot(out) == before


def test_a_search_without_its_record_starts_again_from_scratch(tmp_path):
    "Tune's files left without search.json (deleted, or never ours) are removed unread before a search begins"
    folder = tmp_path/'tune/digits/adam'
    (folder/'_trial_0').mkdir(parents=True)
    (folder/'tuner.pkl').write_bytes(pickle.dumps(Planted(tmp_path/'code-ran')))
    (folder/'.search.lock').write_text('')
    assert scale._clear(folder, keep=('search.json',)) == 2
    assert [f.name for f in folder.iterdir()] == ['.search.lock'] and not (tmp_path/'code-ran').exists()


@pytest.mark.parametrize('cmd', ['run', 'tune'])
@pytest.mark.parametrize('datasets', ['digits', 'mnist5k,digits', 'fashion_mnist,digits'])
def test_a_preset_without_epochs_for_a_dataset_is_one_line(tmp_path, capsys, cmd, datasets):
    out = tmp_path/'results'
    with pytest.raises(SystemExit) as e: main([cmd, '--preset', 'paper', '--datasets', datasets, '--out', str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count('\n') == 1 and "preset 'paper' gives epochs for mnist" in err, err
    assert 'give epochs' in err and not out.exists()
