# megolmo: `make demo` trains the demo, `make test` runs the suite; both set up .venv themselves.
VENV       ?= .venv
PYTHON     ?= python3
PY         := $(VENV)/bin/python
# CPU installs pin the local CPU wheel; on a GPU machine bring your own CUDA build: `make TORCH_SPEC= test`.
TORCH_SPEC ?= -r requirements/cpu.txt
# olmo_eval (downstream tasks) without its tokenizers<0.23 pin; its other dependencies are the `eval` extra.
EVAL_SPEC  ?= ai2-olmo-eval==0.9.0
DEMO_DIR   ?= demo_data
DEMO_RUN   ?= runs/demo
DEMO_RANKS ?= 8
DEMO_PORT  ?= 29517

.PHONY: venv demo recipe-demo ladder-demo test bench gpu-wheels slurm-packages clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py requirements/cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(strip $(TORCH_SPEC)),$(PY) -m pip install -q $(TORCH_SPEC))
	$(PY) -m pip install -q -e '.[test,hf,eval]'
	$(PY) -m pip install -q --no-deps $(EVAL_SPEC)
	touch $@

demo: venv
	$(PY) -m megolmo.data.demo_corpus --output $(DEMO_DIR)
	rm -rf $(DEMO_RUN)
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --nproc-per-node $(DEMO_RANKS) --master-port $(DEMO_PORT) \
		-m megolmo.train data=demo optim=demo trainer=demo parallel=demo3d trainer.run_dir=$(DEMO_RUN)
	@echo "demo run directory: $(abspath $(DEMO_RUN))"

# OLMo 2's recipe in miniature on the tiny model, every job TP2 x PP2 x DP2: stage 1, three stage-2 ingredients,
# their soup (evaluated beside them), SFT on data/demo_chat.jsonl, export to Hugging Face, a chat reply.
recipe-demo: venv
	OMP_NUM_THREADS=1 $(PY) tools/recipe_demo.py --output runs/recipe-demo

# A task-scaling ladder in miniature: 3 tiny sizes x 3 durations through `python -m megolmo.ladder run`, step 1
# fitted on held-out loss, predicting a larger held-out model's; its table, plots in runs/ladder-demo/plots.
ladder-demo: venv
	OMP_NUM_THREADS=1 $(PY) -m megolmo.ladder.miniature --output runs/ladder-demo

test: venv slurm-packages
	$(PY) -m megolmo.evaluation.assets >/dev/null  # the dolma2 tokenizer, fetched once into ~/.cache/megolmo
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests

# tests/test_slurm.py runs slurm/train.sbatch under a real one-node cluster: Debian's Slurm and munge,
# installed here when missing and this is root on Debian (seconds); otherwise those tests say why they skip.
slurm-packages:
	@test -x /usr/sbin/slurmctld || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1 || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client \
		munge >/dev/null; } || echo "could not install Slurm: tests/test_slurm.py will be skipped"

bench: venv
	$(PY) -m pip install -q -e '.[bench]'
	OMP_NUM_THREADS=2 $(PY) tools/bench_train.py

# What a lent GPU machine (CUDA PyTorch and transformers, no network) lacks, as wheels for its Python 3.12:
# carry .whl and run `bash tools/gpu_validate.sh` there.
gpu-wheels: venv
	rm -rf .whl && mkdir -p .whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform any -d .whl hydra-core==1.3.8 omegaconf==2.3.1 torchao==0.18.0
	$(PY) -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3

clean:
	rm -rf $(VENV) $(DEMO_DIR) runs *.egg-info
