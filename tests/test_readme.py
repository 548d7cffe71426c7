"""The README is a newcomer's map: every environment variable a command reads is named in it, and every
link it has points into the repository (a fresh clone has nothing beside it)."""

import re
from pathlib import Path

from runestone import config

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
_READS = re.compile(r"""(?:environ\.get|getenv|env\.get|\bget)\(\s*["']([A-Z][A-Z0-9_]{2,})["']""")


def environment_variables() -> set[str]:
    names = set()
    for path in (ROOT / "runestone").rglob("*.py"):
        names.update(_READS.findall(path.read_text()))
    names.update(var for var, _ in config._ENV_SETTINGS)
    names.update(var for var, _ in config._AWS_ENV)
    names.update(f"{prefix}_{suffix}" for prefix, *_ in config._ENV_PROVIDERS for suffix, _ in config._ENV_PROVIDER_SETTINGS)
    names.update(re.findall(r"\$\{([A-Z][A-Z0-9_]+):-", (ROOT / "scripts" / "_venv.sh").read_text()))
    return names


def test_every_environment_variable_is_documented():
    names = environment_variables()
    assert {"RUNESTONE_API_KEY", "RUNESTONE_CONFIG", "RUNESTONE_LOG_LEVEL", "XDG_DATA_HOME", "OPENAI_BASE_URL"} <= names
    missing = sorted(n for n in names if not re.search(rf"\b{n}\b", README))
    assert missing == [], f"read but not in the README: {missing}"


def test_links_stay_inside_the_repository():
    for target in re.findall(r"\]\(([^)\s]+)\)", README):
        if target.startswith(("http://", "https://", "#")):
            continue
        path = (ROOT / target.split("#")[0]).resolve()
        assert path.is_relative_to(ROOT) and path.exists(), target
    assert "../" not in README
