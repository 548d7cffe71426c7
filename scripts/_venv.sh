# Sourced by scripts/serve, scripts/test and scripts/bench: makes .venv and
# installs the package (with the extra named in $1, if any) when pyproject.toml
# changed since the last install. Needs only Python >= 3.11 and pip.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3}"
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' || {
    echo "runestone needs Python >= 3.11 (found: $("$PYTHON" --version 2>&1)); set PYTHON=python3.11" >&2
    exit 1
}
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
_extra="${1:-}"
_stamp="$VENV/.installed-${_extra:-base}-$("$VENV/bin/python" -c 'import hashlib,sys; print(hashlib.sha1(open(sys.argv[1],"rb").read()).hexdigest()[:12])' "$ROOT/pyproject.toml")"
if [ ! -f "$_stamp" ]; then
    if [ -n "$_extra" ]; then _spec="$ROOT[$_extra]"; else _spec="$ROOT"; fi
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$_spec" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
    touch "$_stamp"
fi
