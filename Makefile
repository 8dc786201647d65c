# Each target creates .venv when missing and installs what it needs.
PY := .venv/bin/python
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-slow bench clean

.venv/installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: .venv/installed
	$(PY) -m flexvlm fit --config experiments/synthetic/flex_attn.yaml --run_test true

test: .venv/installed
	$(PY) -m pytest -q

test-slow: .venv/installed
	$(PY) -m pytest -q -m slow

clean:
	rm -rf .venv lightning_logs runs
