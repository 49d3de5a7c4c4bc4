"""Names chosen on a command line, comma-separated: ``--policies``, ``--faults``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def choose(
    text: str, known: Sequence[str], *, option: str, what: str, groups: Mapping[str, Sequence[str]]
) -> list[str]:
    """The names in ``text``, each once, in the order given; a group's name stands for its members.

    An unknown name, or none at all, is a ValueError that names ``option`` and lists what it takes.
    """
    names: list[str] = []
    for raw in text.split(","):
        name = raw.strip()
        if not name:
            continue
        for member in groups.get(name, (name,)):
            if member not in known:
                listed = ", ".join([*groups, *known])
                raise ValueError(f"{option}: unknown {what} {member!r} (known: {listed})")
            if member not in names:
                names.append(member)
    if not names:
        raise ValueError(f"{option}: no {what} given")
    return names
