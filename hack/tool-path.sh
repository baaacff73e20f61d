#!/usr/bin/env bash
# Prints the directories of the pinned tools (kubectl, helm, …) for PATH.
source "$(dirname "$0")/lib.sh"
echo "$KUBE_BIN_DIR:$HELM_BIN_DIR"
