"""Check the pages of the documentation site in a real browser, without Quarto (or, with --site, as Quarto built it).

1. nbdev processes the notebooks as `nbdev_docs` does before Quarto runs (`proc_nbs`: directives applied,
   exported, import and `show_doc` cells re-run) into `_proc/`, here in this process, where a cell that trains
   (an optimizer step) or starts Ray fails the check, as does nbdev's warning that a cell it runs holds
   imports and other code. `plotly.min.js` goes next to the processed notebooks, as on the site.
2. Every output Quarto cannot draw (plotly's JSON) must carry an HTML rendering as well; every link to a page
   of the site, or to an id on one, must find it (ids by pandoc's rule for headings, as Quarto makes them); every
   formula must be one that pandoc writes as MathML (when pandoc is on PATH); _quarto.yml must keep the site
   offline (MathML, the system's fonts, tools/offline_site.py after the render) and pandoc quiet (no commonmark).
3. nbconvert renders each processed notebook to a page in `_site_check/`, next to `plotly.min.js`,
   served on 127.0.0.1.
4. Headless Chromium opens each page, refusing every request that would leave this machine; console errors,
   page errors and failed requests fail the check. Every plotly figure must be drawn; every 3D scene must
   show more than its grey axes (screenshots in `_site_check/screenshots/`) and turn when dragged.

With `--site DIR` (the site Quarto built, `_docs/`), steps 1-3 are skipped and step 4 opens DIR's own pages
offline: each page that asks for anything from another machine (a CDN) is reported with what it asked for.

Usage: python tools/site_check.py [--chromium PATH] [--site DIR]
       (the browser: PATH, else $CHROMIUM, /usr/bin/chromium, chromium on PATH)
"""
import argparse, json, os, re, shutil, subprocess, sys, threading, warnings
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path
from urllib.parse import urlparse
import numpy as np
import yaml
from torch.optim.optimizer import register_optimizer_step_pre_hook
from jinja2 import DictLoader
from nbconvert import HTMLExporter
from PIL import Image
from nbdev.serve import proc_nbs
from playwright.sync_api import TimeoutError, sync_playwright
from secondorder_cnn.landscape import plotlyjs

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT/'_site_check'
LOCAL = ('127.0.0.1', 'localhost')
FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--enable-unsafe-swiftshader', '--use-angle=swiftshader']

# nbconvert's 'lab' page loads MathJax, mermaid and the widget manager from CDNs: dropped, since nothing may
# leave the machine and none of them draws figures. require.js is replaced by a bare AMD `define`, which is
# what trips plotly.js's UMD wrapper on a real page, so the loader's workaround is still exercised.
TEMPLATE = """{%- extends 'index.html.j2' -%}
{% block html_head_js_requirejs %}<script>window.define = function () {}; window.define.amd = {};</script>{% endblock %}
{% block html_head_js_mathjax %}{% endblock %}
{% block html_head_js_mermaidjs %}{% endblock %}
{% block jupyter_widgets %}{% endblock %}"""

def chromium(path=None) -> str:
    "The browser to drive: `path`, else $CHROMIUM, else Debian's chromium"
    for c in (path, os.environ.get('CHROMIUM'), '/usr/bin/chromium', shutil.which('chromium')):
        if c and Path(c).exists(): return c
    sys.exit("site-check: no Chromium: install Debian's chromium, or give --chromium PATH")

def check_mimes(nb:Path) -> list[str]:
    "One message per output that only plotly's JSON renderer could draw"
    cells = json.loads(nb.read_text(encoding='utf-8'))['cells']
    return [f"{nb.name} cell {i}: a plotly figure without text/html; show it with secondorder_cnn.landscape.Plot"
            for i, c in enumerate(cells) for o in c.get('outputs', [])
            if 'application/vnd.plotly.v1+json' in o.get('data', {}) and 'text/html' not in o['data']]

IMPORTS_AND_CODE = 'Found cells containing imports and other code'

class DocBuildWork(Exception): "Training or a Ray cluster in a cell that nbdev runs while it builds the site"

@contextmanager
def refuse_work():
    "Within: an optimizer step or `ray.init` raises `DocBuildWork`; warnings are recorded into the list it yields"
    def refuse(what):
        raise DocBuildWork(f"{what} in a cell that nbdev runs at doc build: give the work `#| eval: false`, or its "
                           "imports a cell of their own")
    hook = register_optimizer_step_pre_hook(lambda *a: refuse('an optimizer step (training)'))
    try: import ray
    except ImportError: ray = None
    if ray: init, ray.init = ray.init, lambda *a, **k: refuse('ray.init (a Ray cluster)')
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter('always')
            yield seen
    finally:
        hook.remove()
        if ray: ray.init = init

def process() -> Path:
    "The notebooks as nbdev processes them for Quarto, all of them, in this process: `refuse_work` sees every cell"
    with refuse_work() as seen:
        try: proc = proc_nbs(n_workers=0, force=True)
        except Exception as e:
            cause = f"\n{type(e.__cause__).__name__}: {e.__cause__}" if e.__cause__ else ''
            sys.exit(f"site-check: {e}{cause}")
    if mixed := [str(w.message) for w in seen if IMPORTS_AND_CODE in str(w.message)]:
        sys.exit('\n'.join(["site-check: nbdev runs these cells at doc build, since they import: give their imports "
                            "cells of their own"] + [m.split('---')[1].strip() + '\n---' for m in mixed]))
    return proc

FENCE = re.compile(r'^\s*(`{3,}|~{3,})')
HEADING = re.compile(r'^(#{1,6})\s+(.*?)\s*$')
ATTRS = re.compile(r'\s*\{([^{}]*)\}\s*$')
EXPLICIT = re.compile(r'\{[^{}]*?#([^\s}]+)[^{}]*\}|\bid="([^"]+)"')
LINK = re.compile(r'\]\(<?([^)\s>]+)>?(?:\s+"[^"]*")?\)')

def pandoc_id(text:str) -> str:
    "The id pandoc's `auto_identifiers` gives a heading: its text in lower case, words joined by '-', from a letter"
    text = re.sub(r'\[([^\]]*)\]\([^)]*\)', r'\1', text)  # a link's text
    parts = text.split('`')  # code spans (odd parts) verbatim; emphasis marks dropped elsewhere
    t = ''.join(p if i % 2 else re.sub(r'\*+|(?<!\w)_+|_+(?!\w)', '', p) for i, p in enumerate(parts))
    t = '-'.join(''.join(c for c in t.lower() if c.isalnum() or c in '_-.' or c.isspace()).split())
    return t[next((i for i, c in enumerate(t) if c.isalpha()), len(t)):]

def markdown(nb:dict) -> list[str]:
    "The Markdown Quarto reads from a processed notebook: its markdown cells and its Markdown outputs"
    out = []
    for c in nb['cells']:
        if c['cell_type'] == 'markdown': out.append(''.join(c['source']))
        for o in c.get('outputs', []):
            if md := o.get('data', {}).get('text/markdown'): out.append(''.join(md))
    return out

def ids(nb:dict) -> set[str]:
    "Every id a page gets: its headings' (pandoc's rule, repeats numbered), explicit `{#id}` and `id=\"...\"`, labels"
    seen, found = {}, set()
    for md in markdown(nb):
        fenced = None
        for line in md.splitlines():
            if m := FENCE.match(line):
                if fenced is None: fenced = m.group(1)[0]
                elif m.group(1)[0] == fenced: fenced = None
                continue
            if fenced: continue
            found |= {a or b for a, b in EXPLICIT.findall(line)}
            if (h := HEADING.match(line)) and not ATTRS.search(h.group(2)):
                base = pandoc_id(h.group(2)) or 'section'
                n = seen.get(base, 0); seen[base] = n + 1
                found.add(base if n == 0 else f'{base}-{n}')
    for c in nb['cells']:
        for m in re.finditer(r'^#\|\s*label:\s*(\S+)', ''.join(c['source']), re.M): found.add(m.group(1))
    return found

def page(nb:dict, path:Path) -> str:
    "The page a processed notebook becomes: its frontmatter's `output-file` (nbdev's name without the number)"
    fm = next((''.join(c['source']) for c in nb['cells'] if c['cell_type'] == 'raw'), '')
    m = re.search(r'^output-file:\s*(\S+)', fm, re.M)
    return m.group(1).strip() if m else path.with_suffix('.html').name

def check_links(nbs:list[Path], site_url:str) -> list[str]:
    "One message per link from a page to a page of the site, or an id on one, that is not there"
    books = {nb: json.loads(nb.read_text(encoding='utf-8')) for nb in nbs}
    pages = {page(b, nb): b for nb, b in books.items()}
    by_nb = {nb.name: page(b, nb) for nb, b in books.items()}
    known = {p: ids(b) for p, b in pages.items()}
    errs = []
    for nb, b in books.items():
        here = page(b, nb)
        for md in markdown(b):
            for url in LINK.findall(md):
                rel = url.removeprefix(site_url.rstrip('/') + '/')
                if re.match(r'^[a-z][a-z0-9+.-]*:', rel): continue  # another site
                target, _, frag = rel.partition('#')
                target = by_nb.get(target, target) if target.endswith('.ipynb') else target or here
                if not target.endswith('.html'): continue
                if target not in known: errs.append(f"{here}: a link to {url}: no page {target}")
                elif frag and frag not in known[target]: errs.append(f"{here}: a link to {url}: no #{frag} on {target}")
    return errs

def check_formulas(nbs:list[Path]) -> list[str]:
    "One message per formula that pandoc cannot write as MathML, the site's `html-math-method` (if pandoc is here)"
    if not (exe := shutil.which('pandoc')):
        print("site-check: no pandoc on PATH: the formulas were not checked"); return []
    errs = []
    for nb in nbs:
        md = '\n\n'.join(markdown(json.loads(nb.read_text(encoding='utf-8'))))
        r = subprocess.run([exe, '-f', 'markdown', '-t', 'html', '--mathml', '-o', os.devnull], input=md,
                           capture_output=True, text=True, encoding='utf-8')
        errs += [f"{nb.name}: {' '.join(w.split())}" for w in r.stderr.split('[WARNING]') if 'TeX math' in w]
    return errs

def check_quarto(yml:Path, proc:Path) -> list[str]:
    "What in Quarto's `yml` would make the site need a CDN, or pandoc warn, or a script that is not there"
    q, errs = yaml.safe_load(yml.read_text(encoding='utf-8')), []
    fmt, project = q.get('format') or {}, q.get('project') or {}
    html = fmt.get('html') or {}
    if 'commonmark' in fmt: errs.append(f"{yml}: format commonmark cannot write fractions or roots (pandoc warns)")
    if html.get('html-math-method') != 'mathml': errs.append(f"{yml}: html-math-method is not mathml: MathJax is a CDN")
    scss = [t for t in (html.get('theme') or []) if str(t).endswith('.scss')]
    for f in scss + [html.get('css') or 'styles.css']:
        if not (proc/f).is_file(): errs.append(f"{yml}: {f} is not beside the processed notebooks")
    off = re.compile(r'^\$web-font-path:\s*false', re.M)
    if not any((proc/t).is_file() and off.search((proc/t).read_text()) for t in scss):
        errs.append(f"{yml}: no theme file sets $web-font-path: false: the theme's fonts come from Google")
    post = project.get('post-render') or []
    post = [post] if isinstance(post, str) else post
    for script in post:
        if not (proc/script.split()[0]).is_file(): errs.append(f"{yml}: post-render {script} is not there")
    if not any('offline_site.py' in p for p in post):
        errs.append(f"{yml}: post-render does not run tools/offline_site.py: pages keep require.js and jQuery")
    return errs

def render(nbs:list[Path]) -> list[Path]:
    "Each notebook as a standalone page in `OUT`, outputs as they are (nothing executed)"
    exp = HTMLExporter(template_name='lab', extra_loaders=[DictLoader({'site_check.html.j2': TEMPLATE})],
                       template_file='site_check.html.j2')
    pages = [OUT/f'{nb.stem}.html' for nb in nbs]
    for nb, p in zip(nbs, pages): p.write_text(exp.from_filename(str(nb))[0], encoding='utf-8')
    return pages

def serve(folder:Path) -> str:
    "Serve `folder` on 127.0.0.1 in a daemon thread; its URL"
    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args): pass
    srv = ThreadingHTTPServer(('127.0.0.1', 0), partial(Quiet, directory=str(folder)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return f'http://127.0.0.1:{srv.server_port}/'

def coloured(png:bytes) -> float:
    "Share of pixels with real colour: axes, grid and labels are grey, a surface is not"
    s = np.asarray(Image.open(BytesIO(png)).convert('RGB').convert('HSV'))[..., 1]
    return float((s > 60).mean())

DRAWN = """gd => gd._fullLayout && (gd._fullLayout._subplots.gl3d || []).every(s => gd._fullLayout[s]._scene.glplot)
                || gd.textContent.includes('plotly.min.js')"""
CAMERA = "([gd, s]) => JSON.stringify(gd._fullLayout[s]._scene.getCamera().eye)"

def check_page(page, url:str, name:str, shots:Path) -> tuple[int, int, list[str]]:
    "Plotly figures and 3D figures on the page at `url`, and what went wrong there"
    errs = []
    def route(r):
        if urlparse(r.request.url).hostname in LOCAL: return r.continue_()
        errs.append(f"{name}: request off this machine refused: {r.request.url}"); r.abort()
    page.route('**/*', route)
    page.on('console', lambda m: m.type == 'error' and errs.append(f"{name}: console: {m.text}"))
    page.on('pageerror', lambda e: errs.append(f"{name}: page error: {e}"))
    page.on('response', lambda r: r.status >= 400 and not r.url.endswith('favicon.ico')
            and errs.append(f"{name}: {r.status} {r.url}"))
    page.goto(url + name, wait_until='load')
    figs, n3d = page.locator('.plotly-graph-div'), 0
    for i in range(figs.count()):
        fig, tag, shot = figs.nth(i), f"{name} figure {i}", shots/f'{Path(name).stem}-{i}'
        gd = fig.element_handle()
        try: page.wait_for_function(DRAWN, arg=gd, timeout=15_000)
        except TimeoutError: errs.append(f"{tag}: not drawn within 15 s"); continue
        if not page.evaluate("gd => !!gd._fullLayout", gd):
            errs.append(f"{tag}: not drawn: {fig.inner_text()[:120]}"); continue
        if not (scenes := page.evaluate("gd => gd._fullLayout._subplots.gl3d || []", gd)): continue
        n3d += 1
        fig.scroll_into_view_if_needed()
        for s in scenes:
            # WebGL draws on animation frames after newPlot: poll briefly rather than sleep
            for _ in range(20):
                if (c := coloured(fig.locator(f'#{s}').screenshot())) > 0.02: break
                page.wait_for_timeout(100)
            else: errs.append(f"{tag} {s}: blank ({c:.1%} coloured pixels)")
        fig.screenshot(path=f'{shot}.png')
        for s in scenes:
            before, b = page.evaluate(CAMERA, [gd, s]), fig.locator(f'#{s}').bounding_box()
            x, y = b['x'] + b['width'] / 2, b['y'] + b['height'] / 2
            page.mouse.move(x - 60, y); page.mouse.down(); page.mouse.move(x + 60, y + 20, steps=8); page.mouse.up()
            if page.evaluate(CAMERA, [gd, s]) == before: errs.append(f"{tag} {s}: camera did not move when dragged")
        page.mouse.move(0, 0)  # no hover label in the picture
        fig.screenshot(path=f'{shot}-dragged.png')
    return figs.count(), n3d, errs

def site_url() -> str:
    "The site's address, from nbs/nbdev.yml: links to it are links within the site"
    return yaml.safe_load((ROOT/'nbs'/'nbdev.yml').read_text(encoding='utf-8'))['website']['site-url']

def check_pages(exe:str, folder:Path, names:list[str], shots:Path) -> tuple[list[tuple], list[str]]:
    "Open each page `names` of `folder` in Chromium: a row per page, and what went wrong"
    url, rows, errs = serve(folder), [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=FLAGS)
        for name in names:
            page = browser.new_page(viewport=dict(width=1200, height=900))
            n, n3d, e = check_page(page, url, name, shots)
            page.close()
            cdn = sorted({urlparse(m.split('refused: ')[1]).hostname for m in e if 'off this machine' in m})
            rows.append((name, n, n3d, f"needs {', '.join(cdn)}" if cdn else f"{len(e)} failed" if e else "ok"))
            errs += e
        browser.close()
    return rows, errs

def report(rows, errs, shots:Path):
    print(f"{'page':<26}{'figures':>8}{'3D':>4}  result")
    for r in rows: print(f"{r[0]:<26}{r[1]:>8}{r[2]:>4}  {r[3]}")
    if errs: sys.exit('\n'.join(['site-check failed:'] + errs))
    print(f"site-check passed; screenshots in {shots}/")

def check_site(exe:str, site:Path, shots:Path=OUT/'site-screenshots'):
    "The site Quarto built in `site`, offline: every page, and what it asks of other machines"
    if not (site/'index.html').is_file():
        sys.exit(f"site-check: {site} holds no index.html: give the folder that Quarto built")
    names = sorted(str(f.relative_to(site)) for f in site.rglob('*.html') if 'site_libs' not in f.parts)
    shutil.rmtree(shots, ignore_errors=True); shots.mkdir(parents=True)
    report(*check_pages(exe, site, names, shots), shots)

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--chromium', help='browser executable (Chromium or Chrome)')
    ap.add_argument('--site', type=Path, help='check the site Quarto built in this folder (e.g. _docs), offline')
    args = ap.parse_args()
    exe = chromium(args.chromium)
    if args.site: return check_site(exe, args.site.resolve())
    os.chdir(ROOT)  # nbdev finds settings.ini from the working directory
    proc = process()
    plotlyjs(proc)
    nbs = sorted(proc.glob('*.ipynb'))
    errs = check_quarto(proc/'_quarto.yml', proc) + [m for nb in nbs for m in check_mimes(nb)]
    if errs := errs + check_links(nbs, site_url()) + check_formulas(nbs):
        sys.exit('\n'.join(['site-check failed:'] + errs))
    shutil.rmtree(OUT, ignore_errors=True)
    (OUT/'screenshots').mkdir(parents=True)
    shutil.copy(proc/'plotly.min.js', OUT)
    shots = OUT/'screenshots'
    report(*check_pages(exe, OUT, [p.name for p in render(nbs)], shots), shots.relative_to(ROOT))

if __name__ == '__main__': main()
