"""The site's pages without the scripts Quarto adds from a CDN that none of them uses, so that they work offline.

Quarto puts require.js 2.3.6 and jQuery 3.5.1 from cdnjs, and an AMD `define('jquery', ...)` that needs them, into
every page with an HTML output, for the notebook widgets that assume them (quarto-cli, src/core/jupyter/widgets.ts).
This site's HTML outputs are its plotly figures, which load `plotly.min.js` from next to the page and need neither;
offline those scripts fail to load and the `define` call throws "define is not defined". The rest is the site's
own: formulas are MathML, drawn by the browser (`html-math-method: mathml`), and the text is set in the system's
fonts (nbs/theme.scss). `python tools/site_check.py --site _docs` reports any page that still needs a CDN.

Quarto runs this after it renders the site (`post-render` in nbs/_quarto.yml, in the output folder
$QUARTO_PROJECT_OUTPUT_DIR); by hand: python tools/offline_site.py _docs
"""
import os, re, sys
from pathlib import Path

# <script ... src="https://cdnjs.cloudflare.com/ajax/libs/require.js/…"></script>, the same for jquery, and the
# inline define('jquery', …) beside them: whatever the attributes' order and spacing
CDN = re.compile(r'<script\b[^>]*\bsrc="https://cdnjs\.cloudflare\.com/ajax/libs/(?:require\.js|jquery)/[^"]*"[^>]*>'
                 r'\s*</script>[ \t]*\n?')
AMD = re.compile(r"""<script\b[^>]*>\s*define\(\s*['"]jquery['"][^<]*</script>[ \t]*\n?""")

def offline(html:str) -> str:
    "`html` without Quarto's require.js, jQuery and the `define` that needs them"
    return AMD.sub('', CDN.sub('', html))

def main(folder) -> list[Path]:
    "Rewrite the pages under `folder` that hold those scripts; the pages rewritten"
    changed = []
    for f in sorted(Path(folder).rglob('*.html')):
        s = f.read_text(encoding='utf-8')
        if (t := offline(s)) != s: f.write_text(t, encoding='utf-8'); changed.append(f)
    return changed

if __name__ == '__main__':
    folder = sys.argv[1] if len(sys.argv) > 1 else os.environ.get('QUARTO_PROJECT_OUTPUT_DIR')
    if not folder or not Path(folder).is_dir():
        sys.exit(f"offline_site: {folder!r} is not a folder: give the folder Quarto rendered the site into")
    print(f"offline_site: {len(main(folder))} pages without require.js and jQuery from cdnjs")
