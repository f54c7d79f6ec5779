# The two commands of the README. Both create .venv and install on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Pillow draws the embedded dataset's pixels: the records that name a Pillow name 13.0.0
PINS := torch==2.14.1 torchvision==0.29.1 pillow==13.0.0

.PHONY: demo test install clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(PINS)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/softteacher demo

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(VENV)  # runs/ holds trained models: never removed here
