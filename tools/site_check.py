"""Check the pages of the documentation site in a real browser, without Quarto.

1. nbdev processes the notebooks exactly as `nbdev_docs` does before Quarto runs (`proc_nbs`: directives
   applied, exported and import cells re-run) into `_proc/`; `plotly.min.js` goes next to them, as on the site.
2. Every output Quarto cannot draw (plotly's JSON) must carry an HTML rendering as well.
3. nbconvert renders each processed notebook to a page in `_site_check/`, next to `plotly.min.js`,
   served on 127.0.0.1.
4. Headless Chromium opens each page, refusing every request that would leave this machine; console errors,
   page errors and failed requests fail the check. Every plotly figure must be drawn; every 3D scene must
   show more than its grey axes (screenshots in `_site_check/screenshots/`) and turn when dragged.

Usage: python tools/site_check.py [--chromium PATH]   (default: $CHROMIUM, /usr/bin/chromium, chromium on PATH)
"""
import argparse, json, os, shutil, sys, threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path
from urllib.parse import urlparse
import numpy as np
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
    page.on('response', lambda r: r.status >= 400 and not r.url.endswith('favicon.ico') and errs.append(f"{name}: {r.status} {r.url}"))
    page.goto(url + name, wait_until='load')
    figs, n3d = page.locator('.plotly-graph-div'), 0
    for i in range(figs.count()):
        fig, tag, shot = figs.nth(i), f"{name} figure {i}", shots/f'{Path(name).stem}-{i}'
        gd = fig.element_handle()
        try: page.wait_for_function(DRAWN, arg=gd, timeout=15_000)
        except TimeoutError: errs.append(f"{tag}: not drawn within 15 s"); continue
        if not page.evaluate("gd => !!gd._fullLayout", gd): errs.append(f"{tag}: not drawn: {fig.inner_text()[:120]}"); continue
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

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--chromium', help='browser executable (Chromium or Chrome)')
    exe = chromium(ap.parse_args().chromium)
    os.chdir(ROOT)  # nbdev finds settings.ini from the working directory
    proc = proc_nbs()
    plotlyjs(proc)
    nbs = sorted(proc.glob('*.ipynb'))
    if errs := [m for nb in nbs for m in check_mimes(nb)]: sys.exit('\n'.join(errs))
    shutil.rmtree(OUT, ignore_errors=True)
    (OUT/'screenshots').mkdir(parents=True)
    shutil.copy(proc/'plotly.min.js', OUT)
    url, rows, errs = serve(OUT), [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=FLAGS)
        for page_file in render(nbs):
            page = browser.new_page(viewport=dict(width=1200, height=900))
            n, n3d, e = check_page(page, url, page_file.name, OUT/'screenshots')
            page.close()
            rows.append((page_file.name, n, n3d, f"{len(e)} failed" if e else "ok")); errs += e
        browser.close()
    print(f"{'page':<26}{'figures':>8}{'3D':>4}  result")
    for r in rows: print(f"{r[0]:<26}{r[1]:>8}{r[2]:>4}  {r[3]}")
    if errs: sys.exit('\n'.join(['site-check failed:'] + errs))
    print(f"site-check passed; screenshots in {(OUT/'screenshots').relative_to(ROOT)}/")

if __name__ == '__main__': main()
