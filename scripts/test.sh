#!/usr/bin/env bash
# Make the environment (app + test tools) when it is missing, then run the tests.
# Arguments go to pytest, e.g. scripts/test.sh -m slow, or scripts/test.sh tests/test_request.py
source "$(dirname "$0")/env.sh" requirements-dev.txt
exec .venv/bin/python -m pytest -q "$@"
