#!/bin/sh
# The python tool's sandbox needs bubblewrap (bwrap; see llmlab/tools/sandbox.py). Installs it when it is
# missing and this runs as root with apt-get at hand (`apt-get update` first only if the install fails);
# otherwise says how. Exits 0 either way: without bwrap the python tool refuses its calls and the tests that
# need it are skipped, both saying why.
command -v bwrap >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q bubblewrap >/dev/null 2>&1 || {
        apt-get update -q >/dev/null 2>&1 && apt-get install -y -q bubblewrap >/dev/null 2>&1; }
fi
command -v bwrap >/dev/null 2>&1 || echo "note: bubblewrap is not installed (apt-get install bubblewrap, as root);" \
    "the python tool will refuse to run and its tests will be skipped"
exit 0
