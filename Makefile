# secondorder-cnn: `make run` trains, `make test` checks everything. Both install into .venv when needed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# the browser for site-check: Debian's chromium unless given, e.g. CHROMIUM=/usr/bin/google-chrome
CHROMIUM ?= $(firstword $(wildcard /usr/bin/chromium) $(shell command -v chromium))

.PHONY: install run test check-export check-readme readme notebook bench clean plotlyjs site-check docs

install: $(VENV)/.installed

$(VENV)/.installed: settings.ini setup.py pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e ".[dev,ray]"  # ray: the tests of --workers and --address
	touch $@

run: install
	$(BIN)/secondorder-cnn run --preset quick

test: install check-export check-readme
	OMP_NUM_THREADS=1 $(BIN)/nbdev_test  # one thread per notebook process: two-thread workers on two cores wait on each other
	$(BIN)/pytest -q tests
	@if [ -n "$(CHROMIUM)" ]; then $(MAKE) --no-print-directory site-check; else echo "no Chromium: the browser check of the site (make site-check) was skipped"; fi

# the package must be exactly what the notebooks export
check-export: install
	@tmp=$$(mktemp -d) && cp -r secondorder_cnn $$tmp/ && $(BIN)/nbdev_export && \
	if diff -r -x __pycache__ $$tmp/secondorder_cnn secondorder_cnn; then rm -rf $$tmp; \
	else rm -rf $$tmp; echo "secondorder_cnn/ was not what nbs/ exports (now re-exported): review and commit it"; exit 1; fi

# README.md is nbs/index.ipynb rendered to Markdown, without the cells the site hides or shows only the output of
# (`#| hide`, `#| echo: false`: the live figure, which GitHub could not draw)
README_MD := $(BIN)/jupyter nbconvert --to markdown --stdout --log-level=WARN --RegexRemovePreprocessor.patterns='^\#\| (hide|echo: false)' nbs/index.ipynb

readme: install
	$(README_MD) > README.md

check-readme: install
	@$(README_MD) | diff -q - README.md >/dev/null || \
	{ echo "README.md differs from nbs/index.ipynb: run make readme"; exit 1; }

notebook: install
	$(BIN)/jupyter notebook --notebook-dir=nbs

# the figures' script, next to the notebooks for Jupyter and Quarto
plotlyjs: install
	$(BIN)/python -c "from secondorder_cnn.landscape import plotlyjs; plotlyjs('nbs')"

# the site's pages in headless Chromium, without Quarto: no doc-build cell trains, links find their ids, figures
# drawn, 3D scenes turn, nothing fetched from the internet
site-check: install plotlyjs
	CHROMIUM="$(CHROMIUM)" $(BIN)/python tools/site_check.py

# the site with Quarto, in _docs/, then its pages checked offline in Chromium. nbdev_docs writes README.md its own
# way (nbdev_readme): it is written again as `make readme` writes it. Quarto runs tools/offline_site.py with this Python
docs: install plotlyjs
	@if command -v quarto >/dev/null; then \
	  QUARTO_PYTHON="$(abspath $(BIN)/python)" $(BIN)/nbdev_docs && $(README_MD) > README.md && \
	  if [ -n "$(CHROMIUM)" ]; then CHROMIUM="$(CHROMIUM)" $(BIN)/python tools/site_check.py --site _docs; \
	  else echo "no Chromium: the offline check of _docs/ (tools/site_check.py --site _docs) was skipped"; fi; \
	else echo "the site needs Quarto (https://quarto.org/docs/get-started/): running site-check instead"; \
	  $(MAKE) --no-print-directory site-check; fi

bench: install
	$(BIN)/python benchmarks/data.py

clean:
	rm -rf _proc _docs _site_check .pytest_cache nbs/.quarto nbs/plotly.min.js
