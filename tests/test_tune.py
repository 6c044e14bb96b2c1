"`tune`: a search per optimizer on a validation split with Ray Tune, resumable, the best retrained as ordinary runs"
import json, os, signal, subprocess, sys
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


def test_the_validation_split_is_disjoint_from_what_trials_train_on():
    x, y = scale.load_tensors('digits', True)
    tr, va = scale.validation_split(y)
    assert not set(tr.tolist()) & set(va.tolist()) and len(tr) + len(va) == len(y)


def test_a_killed_tune_resumes_keeping_its_finished_trials(ray, tmp_path, capsys):
    out = tmp_path/'results'
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
    kept = {f: f.read_bytes() for f in folder.glob('_trial_*/result.json') if f.read_text()}
    assert kept and not (out/'tune/digits/best.json').exists()
    main(args)
    log = capsys.readouterr().out
    assert 'digits/adam: resuming the search' in log
    assert log.count('a trial ended after') <= 3, log  # one at least was kept
    assert json.loads((out/'tune/digits/best.json').read_text())['optimizers']['adam']['trials'] == 4
    assert len(list(folder.glob('_trial_*'))) == 4
    done = [f for f, v in kept.items() if json.loads(v.splitlines()[-1]).get('done')]
    assert all(f.read_bytes() == kept[f] for f in done)  # the finished trials' results kept, not redone
    assert (out/'digits/adam/seed0/metrics.json').exists()


@pytest.mark.parametrize('args,msg', [
    (['--trials', '0'], 'trials 0 must be an integer >= 1'),
    (['--optimizers', 'adamw'], "optimizer 'adamw' is not allowed"),
    (['--seed', '-1'], "seed -1 must be an integer >= 0"),
    (['--workers', '0'], 'workers 0 must be an integer >= 1'),
    (['--address', f'127.0.0.1:{free_port()}'], 'no Ray cluster answers at'),
    (['--address', 'nowhere'], "address 'nowhere' must be auto, HOST:PORT or ray://HOST:PORT")])
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
