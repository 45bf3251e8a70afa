#!/usr/bin/env bash
# Drift check: install the NEWEST versions setup.py's ranges allow (not constraints.txt) into a
# throw-away venv and run the test suite there, so a registry release that breaks us is seen before
# users see it. torch stays at the lock's version (a newer torch from the registry is a CUDA build).
#
#   bash scripts/check_newest.sh                 # report: versions that differ from the lock + suite
#   bash scripts/check_newest.sh --update-lock   # ... and, if the suite passed, rewrite constraints.txt
#   extra pytest arguments after --, e.g.  bash scripts/check_newest.sh -- -m "not slow"
set -euo pipefail
cd "$(dirname "$0")/.."
update=0
if [ "${1:-}" = "--update-lock" ]; then update=1; shift; fi
[ "${1:-}" = "--" ] && shift
PY=${PYTHON:-python3}
venv=$(mktemp -d /tmp/sipo-newest.XXXXXX)
trap 'rm -rf "$venv"' EXIT
"$PY" -m venv "$venv"
"$venv/bin/pip" install -q "$(grep '^torch==' constraints.txt)"
"$venv/bin/pip" install -q --upgrade -e ".[test]"
"$venv/bin/pip" freeze --exclude-editable | grep -iv '^sipo-plugin' | sed 's/^torch==\([0-9.]*\)+.*/torch==\1/' \
  | sort -f >"$venv/freeze.txt"
echo "== versions that differ from constraints.txt (newest allowed vs lock):"
changes=$(diff <(grep -v '^#' constraints.txt | sort -f) "$venv/freeze.txt" | grep '^[<>]' || true)
echo "${changes:-   none}"
echo "== test suite on the newest versions"
status=0
"$venv/bin/python" -m pytest -q -p no:cacheprovider "$@" || status=$?
if [ "$status" -eq 0 ] && [ "$update" -eq 1 ]; then
  { grep '^#' constraints.txt; cat "$venv/freeze.txt"; } >constraints.txt.new
  mv constraints.txt.new constraints.txt
  echo "== constraints.txt rewritten from the passing venv (review: git diff constraints.txt)"
fi
exit "$status"
