# megolmo: `make demo` trains the demo, `make test` runs the suite; both set up .venv themselves.
VENV       ?= .venv
PYTHON     ?= python3
PY         := $(VENV)/bin/python
# CPU installs pin the local CPU wheel; on a GPU machine bring your own CUDA build: `make TORCH_SPEC= test`.
TORCH_SPEC ?= -r requirements/cpu.txt
DEMO_DIR   ?= demo_data
DEMO_RUN   ?= runs/demo
DEMO_RANKS ?= 8
DEMO_PORT  ?= 29517

.PHONY: venv demo test bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py requirements/cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(strip $(TORCH_SPEC)),$(PY) -m pip install -q $(TORCH_SPEC))
	$(PY) -m pip install -q -e '.[test,hf]'
	touch $@

demo: venv
	$(PY) -m megolmo.data.demo_corpus --output $(DEMO_DIR)
	rm -rf $(DEMO_RUN)
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --nproc-per-node $(DEMO_RANKS) --master-port $(DEMO_PORT) \
		-m megolmo.train data=demo optim=demo trainer=demo parallel=demo3d trainer.run_dir=$(DEMO_RUN)
	@echo "demo run directory: $(abspath $(DEMO_RUN))"

test: venv
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests

bench: venv
	$(PY) -m pip install -q -e '.[bench]'
	OMP_NUM_THREADS=2 $(PY) tools/bench_train.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) runs *.egg-info
