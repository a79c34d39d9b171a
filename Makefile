PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m lorasched.demo prepare demo_work
	$(VENV)/bin/lorasched merge --base demo_work/tiny-sd --subject demo_work/subject.safetensors \
		--style demo_work/style.safetensors --method klora --steps 20 --output demo_work/scheduled.safetensors
	$(VENV)/bin/lorasched inspect demo_work/scheduled.safetensors --max-layers 12
	$(PY) -m lorasched.demo replay demo_work/tiny-sd demo_work/scheduled.safetensors
	$(VENV)/bin/lorasched merge --base demo_work/tiny-sd --subject demo_work/subject.safetensors \
		--style demo_work/style.safetensors --method feature-kl --prompts demo_work/prompts.txt --seeds 0,1 \
		--steps 20 --resolution 32 --output demo_work/calibrated.safetensors
	$(VENV)/bin/lorasched verify demo_work/calibrated.safetensors --base demo_work/tiny-sd --prompts "sks dog on a boat" \
		--seeds 100,101 --resolution 32 --subject demo_work/subject.safetensors --style demo_work/style.safetensors \
		--report demo_work/report

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) -m benchmarks.bench_replay
	$(PY) -m benchmarks.bench_merge
	$(PY) -m benchmarks.bench_calibration

clean:
	rm -rf demo_work build *.egg-info
