import subprocess, sys
from importlib.metadata import entry_points
from secondorder_cnn.cli import main

CMD = [sys.executable, '-c', 'from secondorder_cnn.cli import main; main()']


def test_help_lists_every_subcommand_and_its_options():
    r = subprocess.run([*CMD, '--help'], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stderr == ''
    assert '{run,curvature,report,landscape,import-original,layers,edge,tune}' in r.stdout
    r = subprocess.run([*CMD, 'landscape', '--help'], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    for opt in ('--out', '--datasets', '--optimizers', '--seeds', '--device', '--force', '--samples', '--resolution',
                '--range', '--seed', '--data'):
        assert opt in r.stdout, opt
    assert 'results folder (default: results)' in r.stdout


def test_the_console_script_is_the_cli():
    scripts = {e.name: e.value for e in entry_points(group='console_scripts')}
    assert scripts.get('secondorder-cnn') == 'secondorder_cnn.cli:main'


def test_no_subcommand_is_one_line_and_exit_2(capsys):
    try: main([])
    except SystemExit as e: code = e.code
    err = capsys.readouterr().err
    assert code == 2 and err.startswith('secondorder-cnn: error: ') and err.count('\n') == 1
