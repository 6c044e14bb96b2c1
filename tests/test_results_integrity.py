"Stored results are never stale, never invalid JSON, never another process's half-written file"
import json, math, os, subprocess, sys, time
from pathlib import Path
import pytest, torch
from secondorder_cnn.cli import main
from secondorder_cnn.runs import Run, run_one

pytestmark = pytest.mark.usefixtures('one_thread')
SHORT = ['--epochs', '1', '--bs', '256', '--device', 'cpu']


def strict(f:Path) -> dict:
    "The JSON in `f`, read as strictly as other tools read it: a NaN or an infinity is an error"
    def refuse(c): raise ValueError(f'{f}: {c} is not JSON')
    return json.loads(f.read_text(), parse_constant=refuse)


def test_retrained_run_gets_new_landscape_and_curvature(tmp_path, capsys):
    out, d = str(tmp_path/'res'), tmp_path/'res/digits/adam/seed0'
    main(['run', '--optimizers', 'adam', *SHORT, '--out', out])
    main(['landscape', '--out', out, '--samples', '100', '--resolution', '3', '--device', 'cpu'])
    main(['curvature', '--out', out, '--samples', '100', '--max-iter', '8', '--max-hvp', '9', '--slq-iter', '5',
          '--slq-runs', '1', '--device', 'cpu'])
    old = strict(d/'landscape.json'), strict(d/'curvature.json')
    main(['run', '--optimizers', 'adam', '--epochs', '2', '--bs', '256', '--device', 'cpu', '--force', '--out', out])
    assert sorted(p.name for p in d.iterdir()) == ['config.json', 'metrics.json', 'model.pt']  # nothing of the old run
    capsys.readouterr()
    main(['landscape', '--out', out, '--samples', '100', '--resolution', '3', '--device', 'cpu'])
    assert 'present, skipped' not in capsys.readouterr().out
    new = strict(d/'landscape.json')
    assert new['loss'] != old[0]['loss'] and new['computed_from']['model_sha256'] != old[0]['computed_from']['model_sha256']


def test_changed_budget_or_grid_is_measured_again(tmp_path, capsys):
    out = str(tmp_path/'res')
    main(['run', '--optimizers', 'sgd', *SHORT, '--out', out])
    f = tmp_path/'res/digits/sgd/seed0/curvature.json'
    small = ['--max-iter', '8', '--max-hvp', '9', '--slq-iter', '5', '--slq-runs', '1', '--device', 'cpu']
    main(['curvature', '--out', out, '--samples', '50', *small])
    assert strict(f)['n_samples'] == 50
    capsys.readouterr()
    main(['curvature', '--out', out, '--samples', '100', *small])
    assert 'stale (computed with other settings: samples: 50 there, 100 now)' in capsys.readouterr().out
    assert strict(f)['n_samples'] == 100
    main(['curvature', '--out', out, '--samples', '100', *small])
    assert capsys.readouterr().out == 'digits/sgd/seed0: curvature present, skipped\n'
    g = tmp_path/'res/digits/sgd/seed0/landscape.json'
    main(['landscape', '--out', out, '--samples', '100', '--resolution', '3', '--device', 'cpu'])
    main(['landscape', '--out', out, '--samples', '100', '--resolution', '3', '--range', '1', '--device', 'cpu'])
    assert strict(g)['range'] == [-1.0, 1.0] and 'lo: -0.5 there, -1.0 now' in capsys.readouterr().out


def test_repeated_seeds_are_one_run(tmp_path, capsys):
    main(['run', '--optimizers', 'adam', *SHORT, '--seeds', '0,00,+0', '--out', str(tmp_path/'res')])
    out = capsys.readouterr().out
    assert out.count('digits/adam/seed0: test acc') == 1 and '| digits | adam | 1 | 0 |' in out


def test_even_grid_reports_the_loss_at_the_trained_weights(tmp_path, capsys):
    out = str(tmp_path/'res')
    main(['run', '--optimizers', 'adam', *SHORT, '--out', out])
    capsys.readouterr()
    main(['landscape', '--out', out, '--samples', '100', '--resolution', '2', '--range=-1,1', '--device', 'cpu'])
    ls = strict(tmp_path/'res/digits/adam/seed0/landscape.json')
    assert len(ls['loss']) == 2 and ls['n_nonfinite'] == 0 and math.isfinite(ls['loss_at_weights'])
    assert f"loss {ls['loss_at_weights']:.4f} at the trained weights" in capsys.readouterr().out


def test_overflowing_learning_rate_is_a_diverged_run_and_the_grid_goes_on(tmp_path, capsys):
    out = tmp_path/'res'
    main(['run', '--optimizers', 'sgd,adam,sophiah', '--lr', '1e38', *SHORT, '--out', str(out)])
    for o in ('sgd', 'adam', 'sophiah'):
        m = strict(out/'digits'/o/'seed0/metrics.json')
        assert m['status'] == 'diverged', o
        assert all(torch.isfinite(v).all() for v in torch.load(out/'digits'/o/'seed0/model.pt', weights_only=True).values())
    assert '| digits | adam | 1 | 1 |' in capsys.readouterr().out


def test_a_redone_run_keeps_another_process_temporary_file(tmp_path):
    folder = tmp_path/'res/digits/adam/seed0'
    folder.mkdir(parents=True)
    writer = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    try:
        live, dead = folder/f'.metrics.json.{writer.pid}.tmp', folder/'.metrics.json.999999999.tmp'
        live.write_text('{"half')
        dead.write_text('{"half')
        run_one(Run('digits', 'adam', 0, 1, 256), tmp_path/'res', 'cpu')
        assert live.exists() and not dead.exists()
    finally: writer.kill()
