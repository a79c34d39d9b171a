PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The ComfyUI node's tests run the pinned ComfyUI in ../shared/vendor, which imports torchvision; the index's
# torchvision needs the index's torch, so those tests get their own venv (see tests/comfyui/requirements.txt). The
# WebUI extension's host tests (reForge, Forge, A1111 in ../shared/vendor) run there too, with what those hosts
# import beyond ComfyUI's needs (tests/webui/requirements-*.txt).
COMFY_VENV := .venv-comfy
COMFY_PY := $(COMFY_VENV)/bin/python
COMFY_STAMP := $(COMFY_VENV)/.installed

.PHONY: demo test test-main test-comfyui test-webui install bench clean packs webui-branch

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

WEBUI_REQUIREMENTS := tests/webui/requirements-forge.txt tests/webui/requirements-reforge.txt
WEBUI_NODEPS := tests/webui/requirements-a1111.txt  # k-diffusion's own requirements are training tools

$(COMFY_STAMP): pyproject.toml tests/comfyui/requirements.txt $(WEBUI_REQUIREMENTS) $(WEBUI_NODEPS)
	test -x $(COMFY_PY) || $(PYTHON) -m venv $(COMFY_VENV)
	$(COMFY_PY) -m pip install -q --upgrade pip
	$(COMFY_PY) -m pip install -q -r tests/comfyui/requirements.txt $(addprefix -r ,$(WEBUI_REQUIREMENTS))
	$(COMFY_PY) -m pip install -q --no-deps -r $(WEBUI_NODEPS)
	$(COMFY_PY) -m pip install -q -e '.[test]'
	touch $(COMFY_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m lorasched.demo prepare demo_work
	$(VENV)/bin/lorasched merge --base demo_work/tiny-sd --subject demo_work/subject.safetensors \
		--style demo_work/style.safetensors --method klora --steps 20 --output demo_work/scheduled.safetensors
	$(VENV)/bin/lorasched inspect demo_work/scheduled.safetensors --max-layers 12 --png demo_work/scheduled.png
	$(PY) -m lorasched.demo replay demo_work/tiny-sd demo_work/scheduled.safetensors
	$(VENV)/bin/lorasched merge --base demo_work/tiny-sd --subject demo_work/subject.safetensors \
		--style demo_work/style.safetensors --method feature-kl --prompts demo_work/prompts.txt --seeds 0,1 \
		--steps 20 --resolution 32 --output demo_work/calibrated.safetensors
	$(VENV)/bin/lorasched verify demo_work/calibrated.safetensors --base demo_work/tiny-sd --prompts "sks dog on a boat" \
		--seeds 100,101 --resolution 32 --subject demo_work/subject.safetensors --style demo_work/style.safetensors \
		--report demo_work/report

test: test-main test-comfyui test-webui

test-main: $(STAMP)
	$(PY) -m pytest

test-comfyui: $(COMFY_STAMP)
	PYTHONDONTWRITEBYTECODE=1 $(COMFY_PY) -m pytest -c tests/comfyui/pytest.ini tests/comfyui

# Each WebUI host installs its own `modules` package: one pytest process per host.
WEBUI_HOSTS := $(patsubst tests/webui/test_%.py,%,$(wildcard tests/webui/test_*.py))
test-webui: $(COMFY_STAMP)
	for host in $(WEBUI_HOSTS); do \
		PYTHONDONTWRITEBYTECODE=1 $(COMFY_PY) -m pytest -c tests/webui/pytest.ini tests/webui/test_$$host.py || exit 1; \
	done

bench: $(STAMP) $(COMFY_STAMP)
	$(PY) -m benchmarks.bench_replay
	$(PY) -m benchmarks.bench_merge
	$(PY) -m benchmarks.bench_calibration
	$(PY) -m benchmarks.bench_eval
	$(COMFY_PY) -m benchmarks.bench_hosts

# The node pack and the WebUI extension install alone, so each carries verbatim copies of the one file reader
# (merge/schema.py) and of the ComfyUI-patcher replay the node and reForge share (comfyui-lorasched/patching.py);
# tests/test_layout.py checks the copies are equal.
PACK_COPIES := comfyui-lorasched/schema.py sd-webui-lorasched/lorasched_webui/schema.py \
	sd-webui-lorasched/lorasched_webui/patching.py
packs: $(PACK_COPIES)

comfyui-lorasched/schema.py sd-webui-lorasched/lorasched_webui/schema.py: merge/schema.py
	cp $< $@

sd-webui-lorasched/lorasched_webui/patching.py: comfyui-lorasched/patching.py
	cp $< $@

# The WebUI's "Install from URL" clones a repository whose root is the extension: this branch is that folder alone.
webui-branch: $(PACK_COPIES)
	git subtree split --prefix=sd-webui-lorasched -b sd-webui-lorasched

clean:
	rm -rf demo_work build *.egg-info
