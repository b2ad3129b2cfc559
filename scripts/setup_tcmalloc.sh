#!/usr/bin/env bash
# Install tcmalloc, the allocator `main.py --lean` runs on where the system has it (ldm/malloc.py): the same
# memory as glibc's settings with far fewer page faults (about 1.4 s per LDM 1.4B step). Optional: without
# it --lean falls back to glibc. Debian and Ubuntu only (libtcmalloc-minimal4), as root or with sudo.
set -euo pipefail
cd "$(dirname "$0")/.."
found() { python3 -c "import sys; from ldm.malloc import find_tcmalloc; sys.exit(find_tcmalloc() is None)"; }
if found; then
  echo "setup_tcmalloc.sh: tcmalloc is installed already"
  exit 0
fi
if ! command -v apt-get > /dev/null; then
  echo "setup_tcmalloc.sh: error: no apt-get here; install gperftools' tcmalloc with your package manager" >&2
  exit 1
fi
sudo=()
if [ "$(id -u)" != 0 ]; then
  sudo=(sudo)
fi
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq libtcmalloc-minimal4
found && echo "setup_tcmalloc.sh: installed libtcmalloc-minimal4"
