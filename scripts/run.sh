#!/usr/bin/env bash
# Make the environment when it is missing, then serve the app (default: the bundled model).
# Arguments go to app.py, e.g. scripts/run.sh --model path/to/diffusers-folder --port 7861
source "$(dirname "$0")/env.sh" requirements.txt
exec .venv/bin/python app.py "$@"
