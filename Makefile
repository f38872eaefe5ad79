# The two commands of the README: `make run` and `make test`.
PY := .venv/bin/python
PORT ?= 8501

.PHONY: run test install install-dev benchmark evaluate

.venv/installed: requirements.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

.venv/installed-dev: .venv/installed requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

install: .venv/installed
install-dev: .venv/installed-dev

run: .venv/installed
	$(PY) -m streamlit run app.py --server.port $(PORT) --server.headless true

test: .venv/installed-dev
	$(PY) -m pytest -q tests

benchmark: .venv/installed
	$(PY) -m training.benchmark

evaluate: .venv/installed
	@test -n "$(DATA)" || (echo "usage: make evaluate DATA=path/to/class/folders [PANEL=blood_cells]"; exit 2)
	$(PY) -m training.evaluate --checkpoint assets/model/hemascribe_default.safetensors --data $(DATA) $(if $(PANEL),--panel $(PANEL),)
