# Each target creates .venv when it is missing and installs what it needs.
PY := .venv/bin/python
LMMS_PY := .venv/lmms/bin/python
TORCH := torch==2.14.1 torchvision==0.29.1
SYNTHETIC := experiments/synthetic
EVALS := "$(SYNTHETIC)/flex_attention_ratio.yaml+$(SYNTHETIC)/eval/as_random.yaml" \
         "$(SYNTHETIC)/flex_attention_ratio.yaml+$(SYNTHETIC)/eval/as_center.yaml"

.PHONY: demo test test-slow sweep protocol axes bench clean

.venv/installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# lmms-eval (tests/test_lmms_eval.py; README, "Evaluating on benchmarks") in a venv of its own, inside
# .venv: its pins (filelock<4, and protobuf<7 through wandb==0.25.0) break transformers 5's sentencepiece
# conversion, which other tests use. torch is pinned on the same line, so that its packages cannot move it
.venv/lmms/installed: pyproject.toml
	test -x $(LMMS_PY) || python3 -m venv .venv/lmms
	$(LMMS_PY) -m pip install -q --upgrade pip
	$(LMMS_PY) -m pip install -q -e '.[test,lmms]' $(TORCH)
	touch $@

# the main job: train the default flex model on the built-in task, test it, draw its selections
demo: .venv/installed
	$(PY) -m flexvlm fit --config configs/synthetic.yaml --config $(SYNTHETIC)/flex_attn.yaml --test_after_fit true

# .venv/lmms installs (about 3 minutes) while the main suite runs, then its tests run; the exit status
# is the first failure's
test: .venv/installed
	@$(MAKE) --no-print-directory .venv/lmms/installed > .venv/lmms-install.log 2>&1 & install=$$!; \
	$(PY) -m pytest -q --ignore=tests/test_lmms_eval.py; main=$$?; \
	if ! wait $$install; then cat .venv/lmms-install.log; echo "installing .venv/lmms failed"; exit 1; fi; \
	$(LMMS_PY) -m pytest -q tests/test_lmms_eval.py; lmms=$$?; \
	exit $$(( main ? main : lmms ))

test-slow: .venv/installed
	$(PY) -m pytest -q -m slow

# every synthetic experiment trained from scratch in one stage -> runs/sweep/results.{csv,md}, accuracy_vs_flops.png
sweep: .venv/installed
	$(PY) -m flexvlm.sweep $(SYNTHETIC) $(EVALS) --jobs 2 --out runs/sweep \
		--extra --data.init_args.num_workers 1 \
		--trainer.enable_progress_bar false

# the two-stage protocol: every mode from one low-res-only model per seed -> runs/protocol/results.md
protocol: .venv/installed
	$(PY) -m flexvlm.protocol $(SYNTHETIC)/protocol/protocol.yaml --out runs/protocol

# the same protocol along two axes: five vision towers, three decoder sizes -> runs/axes/results.md
axes: .venv/installed
	$(PY) -m flexvlm.protocol $(SYNTHETIC)/protocol/axes.yaml --out runs/axes

bench: .venv/installed
	mkdir -p runs && $(PY) scripts/bench_efficiency.py --json runs/benchmarks.json

clean:
	rm -rf .venv runs
