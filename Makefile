# The two commands of the README. Each does all set-up on a fresh machine (scripts/setup.sh).
.PHONY: setup demo quick test

setup:
	@bash scripts/setup.sh

# The main job: the default recipe (hf_kd/recipes/rotten_tomatoes.yaml, packaged; recipes/ links to it), offline.
demo: setup
	HF_HUB_OFFLINE=1 .venv/bin/hf-kd distill

quick: setup
	HF_HUB_OFFLINE=1 .venv/bin/hf-kd distill --quick

# The whole test suite, slow end-to-end runs included.
test: setup
	HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q
