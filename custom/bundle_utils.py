"""Small helpers the bundle configs call: where the bundle lives, the demo data, CLI flags."""

from __future__ import annotations

from pathlib import Path

from custom.demo import make_demo_dataset


def bundle_root(name: str) -> str:
    """
    The bundle's folder, whatever the working directory: in an exported model-zoo bundle custom/
    sits inside the bundle itself; in this repository the bundle is bundles/<name>.
    """
    package_parent = Path(__file__).resolve().parent.parent
    if (package_parent / "configs" / "metadata.json").is_file():
        return str(package_parent)
    return str(package_parent / "bundles" / name)


def demo_dataset(root: str, layout: str) -> str:
    """The bundle's built-in demo dataset (generated on first use into <bundle>/demo_data)."""
    return str(make_demo_dataset(Path(root) / "demo_data", layout))


def as_bool(value: bool | str | int, name: str) -> bool:
    """A CLI flag as a bool: fire passes `--flag true` as the string "true", which is truthy as is."""
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no", ""):
            return False
        raise ValueError(f"--{name} must be true or false, got {value!r}.")
    return bool(value)
