"""README stays in step with the code where a drift would mislead a user."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_environment_switch_is_in_the_readme_table():
    """Each TURBOTUNE_* variable the package reads has a row in README's "Environment switches" table."""
    read = set()
    for path in (ROOT / "src" / "turbotune").rglob("*.py"):
        read |= set(re.findall(r"""environ(?:\.get\(|\[)\s*["'](TURBOTUNE_[A-Z0-9_]+)""", path.read_text()))
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Environment switches", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `(TURBOTUNE_[A-Z0-9_]+)` \|", table, flags=re.M))
    assert len(read) >= 8 and read <= listed, f"not in README's table: {sorted(read - listed)}"
