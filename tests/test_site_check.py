"The site's own checks (tools/site_check.py) and the offline rewrite of Quarto's pages (tools/offline_site.py)"
import json, os, shutil, sys
from pathlib import Path
import pytest, torch

TOOLS = Path(__file__).resolve().parent.parent/'tools'
sys.path.insert(0, str(TOOLS))
import offline_site, site_check  # noqa: E402

SITE = 'https://example.github.io/proj'

def nb(*cells, page=None) -> dict:
    "A processed notebook: ('md', text) and ('code', source, markdown output) cells, with nbdev's frontmatter"
    out = [dict(cell_type='raw', source=f'---\noutput-file: {page}\ntitle: T\n---\n', metadata={})] if page else []
    for kind, s, *md in cells:
        c = dict(cell_type='markdown' if kind == 'md' else 'code', source=s, metadata={})
        if kind == 'code': c['outputs'] = [dict(output_type='display_data', data={'text/markdown': m}) for m in md]
        out.append(c)
    return dict(cells=out, metadata={}, nbformat=4, nbformat_minor=5)

def write(folder:Path, **books) -> list[Path]:
    for name, b in books.items(): (folder/f'{name}.ipynb').write_text(json.dumps(b), encoding='utf-8')
    return sorted(folder.glob('*.ipynb'))

@pytest.mark.parametrize('heading, id_', [  # pandoc's manual (Extension: auto_identifiers) and our own headings
    ('Heading identifiers in HTML', 'heading-identifiers-in-html'), ("Maître d'hôtel", 'maître-dhôtel'),
    ('*Dogs*?--in *my* house?', 'dogs--in-my-house'), ('[HTML], [S5], or [RTF]?', 'html-s5-or-rtf'),
    ('3. Applications', 'applications'), ('`LeNet5.for_dataset`', 'lenet5.for_dataset'),
    ('K-FAC: Kronecker factors', 'k-fac-kronecker-factors'), ('`_f32` and _x_', 'f32-and-x'), ('33', '')])
def test_pandoc_id(heading, id_): assert site_check.pandoc_id(heading) == id_

def test_ids():
    b = nb(('md', '# Top\n\n## Top\n\n```bash\n# not a heading\n```\n\n## Named {#mine .unnumbered}\n\n[x]{#span}'),
           ('code', '#| label: fig-one\nx', '### f\n\n<a id="raw"></a>'), ('md', '# 42'))
    assert site_check.ids(b) == {'top', 'top-1', 'mine', 'span', 'fig-one', 'f', 'raw', 'section'}

def test_check_links(tmp_path):
    nbs = write(tmp_path, **{
        '01_model': nb(('md', '# Model\n\n## fit\n\n[here](#fit), [data](data.html#load), [nb](00_data.ipynb#load).'),
                       page='model.html'),
        '00_data': nb(('md', f'# Data\n\n[gone]({SITE}/model.html#lenet5.for_dataset), [no page](runs.html), '
                             f'[ok]({SITE}/model.html#fit), [elsewhere](https://pytorch.org/x.html#y), [file](x.csv)'),
                      ('code', 'show_doc(load)', '### load'), page='data.html')})
    assert site_check.check_links(nbs, SITE) == [
        f"data.html: a link to {SITE}/model.html#lenet5.for_dataset: no #lenet5.for_dataset on model.html",
        "data.html: a link to runs.html: no page runs.html"]

def test_refuse_work():
    "Within `refuse_work` an optimizer step and `ray.init` raise; outside, both are as they were"
    w = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([w], lr=1.0)
    w.grad = torch.ones(1)
    with site_check.refuse_work() as seen:
        with pytest.raises(site_check.DocBuildWork, match='an optimizer step'): opt.step()
        ray = pytest.importorskip('ray')
        with pytest.raises(site_check.DocBuildWork, match='ray.init'): ray.init(num_cpus=1)
        import warnings; warnings.warn('Found cells containing imports and other code. See FAQ.')
    assert [str(m.message)[:11] for m in seen] == ['Found cells']
    opt.step()
    assert w.item() == -1.0 and ray.init.__module__.startswith('ray')

def test_process_refuses_training(tmp_path, monkeypatch):
    "nbdev's doc processing of a notebook whose import cell trains: the check stops, naming the cell"
    root = Path(__file__).resolve().parent.parent
    shutil.copy(root/'settings.ini', tmp_path)
    (tmp_path/'nbs').mkdir()
    cell = lambda s: dict(cell_type='code', source=s, metadata={}, outputs=[], execution_count=None)
    train = ('import torch\nw = torch.zeros(1, requires_grad=True); o = torch.optim.SGD([w], lr=0.1)\n'
             'w.grad = torch.ones(1); o.step()')
    book = dict(cells=[cell('#| export\nx = 1'), cell(train)], metadata={}, nbformat=4, nbformat_minor=5)
    (tmp_path/'nbs'/'a.ipynb').write_text(json.dumps(book), encoding='utf-8')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e: site_check.process()
    assert 'o.step()' in str(e.value) and 'an optimizer step (training) in a cell that nbdev runs' in str(e.value)
    book['cells'][1] = cell('import torch\nprint(torch.ones(1))')  # imports and other code: warned, so refused
    (tmp_path/'nbs'/'a.ipynb').write_text(json.dumps(book), encoding='utf-8')
    with pytest.raises(SystemExit) as e: site_check.process()
    assert 'give their imports cells of their own' in str(e.value) and 'print(torch.ones(1))' in str(e.value)
    book['cells'][1:] = [cell('import torch'), cell('print(torch.ones(1))')]
    (tmp_path/'nbs'/'a.ipynb').write_text(json.dumps(book), encoding='utf-8')
    assert (site_check.process()/'a.ipynb').exists()

# the head Quarto writes into a page with an HTML output (quarto-cli src/core/jupyter/widgets.ts), with the
# attribute spacing its HTML serialiser may change
QUARTO_HEAD = ('<head>\n'
    '<script src="https://cdnjs.cloudflare.com/ajax/libs/require.js/2.3.6/require.min.js" integrity="sha512-c3Nl8+7g4L'
    'MSTdrm621y7kf9v3SDPnhxLNhcjFJbKECVnmZHTdo+IRO05sNLTH/D3vA6u1X32ehoLC7WFVdheg==" crossorigin="anonymous">'
    '</script>\n'
    '<script src="https://cdnjs.cloudflare.com/ajax/libs/jquery/3.5.1/jquery.min.js" integrity="sha512-bLT0Qm9VnAYZDfl'
    'yKcBaQ2gg0hSYNQrJ8RilYldYQ1FxQYoCLtUjuuRuZo+fjqhx/qtq/1itJ0C2ejDxltZVFg==" crossorigin="anonymous" '
    'data-relocate-top="true"></script>\n'
    '<script type="application/javascript" data-relocate-top="true">define(\'jquery\', [],function() '
    '{return window.jQuery;})</script>\n'
    '<script src="site_libs/quarto-html/quarto.js"></script>\n'
    '<script>define = undefined; // our own</script>\n'
    '</head>')

def test_offline():
    out = offline_site.offline(QUARTO_HEAD)
    assert out == ('<head>\n<script src="site_libs/quarto-html/quarto.js"></script>\n'
                   '<script>define = undefined; // our own</script>\n</head>')
    assert offline_site.offline(out) == out
    swapped = ('<script crossorigin="anonymous" src="https://cdnjs.cloudflare.com/ajax/libs/jquery/3.5.1/jquery.min.js"'
               ' >'
               '\n</script>')
    assert offline_site.offline(swapped) == ''

def test_offline_main(tmp_path):
    (tmp_path/'sub').mkdir()
    (tmp_path/'a.html').write_text(QUARTO_HEAD, encoding='utf-8')
    (tmp_path/'sub'/'b.html').write_text('<p>nothing from a CDN</p>', encoding='utf-8')
    before = (tmp_path/'sub'/'b.html').stat().st_mtime_ns
    assert offline_site.main(tmp_path) == [tmp_path/'a.html']
    assert 'cdnjs' not in (tmp_path/'a.html').read_text() and (tmp_path/'sub'/'b.html').stat().st_mtime_ns == before

@pytest.mark.skipif(not (os.environ.get('CHROMIUM') or shutil.which('chromium') or Path('/usr/bin/chromium').exists()),
                    reason='no Chromium: the offline check of a built site needs a browser')
def test_check_site_offline(tmp_path, capsys):
    "A built site's pages in the browser, offline: the page that needs a CDN is named with the host it asked"
    (tmp_path/'index.html').write_text('<html><body><p>home</p><script src="local.js"></script></body></html>')
    (tmp_path/'local.js').write_text('document.title = "ok";')
    (tmp_path/'page.html').write_text('<html><head><script src="https://cdn.example.org/lib.js"></script></head>')
    exe = site_check.chromium()
    with pytest.raises(SystemExit) as e: site_check.check_site(exe, tmp_path, tmp_path/'shots')
    assert 'page.html: request off this machine refused: https://cdn.example.org/lib.js' in str(e.value)
    rows = capsys.readouterr().out
    assert 'index.html' in rows and 'needs cdn.example.org' in rows.splitlines()[-1]
    (tmp_path/'page.html').unlink()
    site_check.check_site(exe, tmp_path, tmp_path/'shots')
    assert 'site-check passed' in capsys.readouterr().out
    with pytest.raises(SystemExit, match='holds no index.html'):
        site_check.check_site(exe, tmp_path/'no', tmp_path/'shots')

@pytest.mark.skipif(not shutil.which('pandoc'), reason='no pandoc: the formulas are checked with it')
def test_check_formulas(tmp_path):
    "A formula pandoc cannot write as MathML is named; fractions, roots and aligned lines are not"
    good = nb(('md', r'$\frac1N\sum_i \sqrt{v_i}$ and $$\begin{aligned} a &= b \\ c &= d \end{aligned}$$'))
    bad = nb(('md', r'fine $x^2$, then $\begin{nosuchenv} x \end{nosuchenv}$'), ('code', 'x', r'$\frac{1$'))
    nbs = write(tmp_path, a=good, b=bad)
    errs = site_check.check_formulas(nbs)
    assert len(errs) == 2 and all(e.startswith('b.ipynb: Could not convert TeX math') for e in errs), errs
    assert 'nosuchenv' in errs[0] and r'\frac{1' in errs[1]

NBDEV_DEFAULT = '''project:
  type: website
format:
  html:
    theme: cosmo
    css: styles.css
  commonmark: default
'''

def test_check_quarto(tmp_path):
    "nbdev's default _quarto.yml fails on every count; the project's own passes"
    (tmp_path/'styles.css').write_text('')
    (tmp_path/'_quarto.yml').write_text(NBDEV_DEFAULT)
    errs = site_check.check_quarto(tmp_path/'_quarto.yml', tmp_path)
    assert [e.split(': ', 1)[1].split(' ')[0] for e in errs] == ['format', 'html-math-method', 'no', 'post-render']
    root = Path(__file__).resolve().parent.parent
    proc = tmp_path/'proc'
    proc.mkdir()
    for f in ('_quarto.yml', 'theme.scss', 'styles.css'): shutil.copy(root/'nbs'/f, proc)
    assert site_check.check_quarto(proc/'_quarto.yml', proc) == [
        f"{proc/'_quarto.yml'}: post-render ../tools/offline_site.py is not there"]
    (tmp_path/'tools').mkdir(); shutil.copy(root/'tools'/'offline_site.py', tmp_path/'tools')
    assert site_check.check_quarto(proc/'_quarto.yml', proc) == []
