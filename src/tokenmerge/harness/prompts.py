"""Prompt sets: built-in ones shipped with the package (``imagenet``, ``general``) and user prompt files.

A prompt file is UTF-8 text with one prompt per line; blank lines and lines starting with ``#`` are ignored.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from tokenmerge.errors import HarnessError

#: Built-in set name -> (file in ``tokenmerge/harness/prompts``, template applied to each line).
BUILTIN: dict[str, tuple[str, str]] = {
    "imagenet": ("imagenet.txt", "a photo of a {}"),
    "general": ("general.txt", "{}"),
}


def parse_prompts(text: str, source: str) -> list[str]:
    """The prompts of a prompt file's text; :class:`HarnessError` if it has none or contains control characters."""
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if any(ord(ch) < 32 for ch in line):
            raise HarnessError(f"malformed prompt file {source}: control character on line {number}")
        prompts.append(line)
    if not prompts:
        raise HarnessError(f"malformed prompt file {source}: no prompts (one per line; '#' starts a comment)")
    return prompts


def load_prompts(name_or_path: str, limit: int | None = None) -> list[str]:
    """A built-in prompt set by name, or the prompts of a file; at most ``limit`` of them (the first ones)."""
    if name_or_path in BUILTIN:
        filename, template = BUILTIN[name_or_path]
        text = resources.files("tokenmerge.harness").joinpath("prompts", filename).read_text(encoding="utf-8")
        prompts = [template.format(p) for p in parse_prompts(text, name_or_path)]
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise HarnessError(
                f"prompt set {name_or_path!r} is neither a file nor a built-in set ({', '.join(BUILTIN)})"
            )
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise HarnessError(f"malformed prompt file {path}: not UTF-8 text") from None
        prompts = parse_prompts(text, str(path))
    return prompts if limit is None else prompts[:limit]
