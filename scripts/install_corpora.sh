#!/usr/bin/env bash
# Installs the Python 3.11 documentation sources (Debian python3.11-doc), the second measured corpus.
set -euo pipefail
DOCS=/usr/share/doc/python3.11/html/_sources
if [ -d "$DOCS" ]; then exit 0; fi
if command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO=sudo; else
      echo "warning: $DOCS missing and not root; install it with: apt-get install python3.11-doc" >&2; exit 0
    fi
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3.11-doc >/dev/null
else
  echo "warning: $DOCS missing; install Debian's python3.11-doc to use the pydocs corpus" >&2
fi
