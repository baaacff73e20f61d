#!/usr/bin/env bash
# A cached virtual environment with promptflow-devkit (pinned), telemetry off in an isolated
# PF_HOME, so e2e tests can serve a real flow with `pf flow serve`. Idempotent; prints the venv.
source "$(dirname "$0")/lib.sh"

VENV="$PF_CACHE/venv/promptflow-devkit-$PROMPTFLOW_VERSION"
if [ ! -x "$VENV/bin/pf" ] || [ ! -f "$VENV/.complete" ]; then
  log "installing promptflow-devkit $PROMPTFLOW_VERSION into $VENV (once; about a minute)"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "promptflow-devkit==$PROMPTFLOW_VERSION" >&2
  mkdir -p "$VENV/pf-home"
  # The machines have no internet: telemetry off before first use.
  PF_HOME="$VENV/pf-home" "$VENV/bin/pf" config set telemetry.enabled=false >/dev/null 2>&1 || true
  touch "$VENV/.complete"
fi
echo "$VENV"
