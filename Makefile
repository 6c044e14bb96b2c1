# secondorder-cnn: `make run` trains, `make test` checks everything. Both install into .venv when needed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: install run test check-export check-readme readme notebook bench clean

install: $(VENV)/.installed

$(VENV)/.installed: settings.ini setup.py pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e ".[dev]"
	touch $@

run: install
	$(BIN)/secondorder-cnn run --preset quick

test: install check-export check-readme
	$(BIN)/nbdev_test
	$(BIN)/pytest -q tests

# the package must be exactly what the notebooks export
check-export: install
	@tmp=$$(mktemp -d) && cp -r secondorder_cnn $$tmp/ && $(BIN)/nbdev_export && \
	if diff -r -x __pycache__ $$tmp/secondorder_cnn secondorder_cnn; then rm -rf $$tmp; \
	else rm -rf $$tmp; echo "secondorder_cnn/ was not what nbs/ exports (now re-exported): review and commit it"; exit 1; fi

# README.md is nbs/index.ipynb rendered to Markdown
readme: install
	$(BIN)/jupyter nbconvert --to markdown --stdout --log-level=WARN nbs/index.ipynb > README.md

check-readme: install
	@$(BIN)/jupyter nbconvert --to markdown --stdout --log-level=WARN nbs/index.ipynb | diff -q - README.md >/dev/null || \
	{ echo "README.md differs from nbs/index.ipynb: run make readme"; exit 1; }

notebook: install
	$(BIN)/jupyter notebook --notebook-dir=nbs

bench: install
	$(BIN)/python benchmarks/data.py

clean:
	rm -rf _proc _docs .pytest_cache nbs/.quarto
