# The verbs a person types. Every target installs what it needs into .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch and torchvision are installed together, pinned to a matching pair (a lone unpinned torch can pull a
# build that breaks torchvision). Override on other machines: make test TORCH_PIN="torch==X torchvision==Y".
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: install test test-slow train data lint bench gpu-check browser clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install $(TORCH_PIN)
	$(PY) -m pip install -e '.[dev]' $(TORCH_PIN)
	# the official PQ reference the tests compare against; its metadata pins numpy<2, so without its deps
	$(PY) -m pip install --no-deps 'panopticapi-lite>=0.2'
	# cityscapes' instance evaluation, the reference tests/test_eval_cityscapes.py compares against; its metadata
	# requires the 'typing' backport, which does not install on Python 3: without its deps, plus the one it imports
	$(PY) -m pip install --no-deps 'cityscapesscripts==2.3.0' 'pyquaternion>=0.9'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -m "not slow and not gpu"

test-slow: $(STAMP)
	$(PY) -m pytest -m "slow"

# The default experiment (conf/experiment/synthshapes_joint.yaml): generates synthshapes under data/ on first use,
# trains the small model on 2 CPU cores (~15-17 min), validates, prints the metrics table, writes checkpoints and
# prediction overlays under outputs/. Extra Hydra overrides: make train ARGS="trainer.max_epochs=6".
train: $(STAMP)
	$(PY) -m openseed.train $(ARGS)

bench: $(STAMP)
	$(PY) -m data_prep.benchmark

# Every GPU figure in one run (docs/kernels.md, "GPU check"): the gpu tests, the deformable-attention benchmark, a
# full-size Swin-T training step at 1024 px in bf16, converted Swin-T inference at 800 x 1333, a few FSDP steps.
# Writes $(GPU_CHECK_OUT)/gpu_check.json and gpu_check.md; without CUDA it says so and exits 0.
GPU_CHECK_OUT ?= runs/gpu_check
gpu-check: $(STAMP)
	$(PY) -m openseed.gpu_check out=$(GPU_CHECK_OUT)

# Chromium and its driver from Debian, for the annotation page's browser test (tests/test_annotate_browser.py; it is
# skipped, saying why, without them). Needs root or password-less sudo; does nothing when both are there.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then echo "chromium and chromedriver: present"; \
	else SUDO=$$( [ "$$(id -u)" = 0 ] || echo "sudo -n" ); \
	  $$SUDO apt-get install -y --no-install-recommends chromium chromium-driver \
	  || ($$SUDO apt-get update && $$SUDO apt-get install -y --no-install-recommends chromium chromium-driver); fi

lint: $(STAMP)
	$(PY) -m ruff check openseed data_prep tests experiments

clean:
	rm -rf $(VENV) .pytest_cache
