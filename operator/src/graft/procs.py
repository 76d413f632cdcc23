"""Process trees from /proc (Linux), for signalling a trainer and everything it started.

torchrun starts its workers in sessions of their own, so a process group does not cover
them; the parent links in /proc do.
"""

from __future__ import annotations

from pathlib import Path


def _children_by_parent() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        # comm may hold spaces and parentheses; the fields after the last ')' do not
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1:
            out.setdefault(int(fields[1]), []).append(int(d.name))
    return out


def children(pid: int) -> list[int]:
    """The direct children of ``pid``."""
    return _children_by_parent().get(pid, [])


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, each after its parent (reverse it to go leaves first)."""
    by_parent = _children_by_parent()
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in by_parent.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out
