#!/usr/bin/env python3
"""Reads the `crate::` and `super::` paths of a Rust crate's sources and
fails when modules depend on each other in a cycle.

Usage: python3 .ci/modules.py [SRC_DIR]   (default: src)

Every file is a module (src/foo.rs and src/foo/bar.rs are `foo` and
`foo::bar`; src/lib.rs is the crate; src/main.rs and test modules after a
`#[cfg(test)]` line are left out). A path names the module it reaches (the
longest module prefix). Each dependency A -> B is looked at where A and B
part ways: between the two children of their closest common module that
hold them. A child using its parent's items, or a parent its child's, is
one subtree and not a dependency between siblings. Among the siblings of
every module, the dependencies must not form a cycle.

It also reads the code map of ARCHITECTURE.md (the table whose rows
start with a backticked module name, outside in) and fails when a
top-level module depends on one listed above it, or when a top-level
module is missing from the table or the table names one that does not
exist: the table's order is the claim "each depends only on modules
further down".

It prints the dependencies between top-level modules, then every cycle at
any level and every dependency against the code map's order, and exits 1
if there is one.
"""

import os
import re
import sys
from collections import defaultdict

SRC = sys.argv[1] if len(sys.argv) > 1 else "src"


def module_of(path):
    rel = os.path.relpath(path, SRC)[: -len(".rs")]
    if rel in ("lib", "main"):
        return None if rel == "main" else ()
    return tuple(rel.split(os.sep))


def code_of(path):
    lines = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip().startswith("#[cfg(test)]"):
                break
            stripped = line.split("//", 1)[0]
            lines.append(stripped)
    return "".join(lines)


files = {}
for root, _, names in os.walk(SRC):
    for name in names:
        if name.endswith(".rs"):
            path = os.path.join(root, name)
            module = module_of(path)
            if module is not None:
                files[module] = code_of(path)
modules = set(files)


def resolve(segments):
    """The longest module prefix of a path."""
    for n in range(len(segments), -1, -1):
        if tuple(segments[:n]) in modules:
            return tuple(segments[:n])
    return ()


def expand(path_text):
    """`a::{b, c::d}` -> ["a::b", "a::c::d"] (one level of braces)."""
    m = re.match(r"^(.*?)::\{(.*)\}$", path_text, re.S)
    if not m:
        return [path_text]
    head, inner = m.group(1), m.group(2)
    out = []
    for part in re.split(r",(?![^{]*\})", inner):
        part = part.strip()
        if part:
            out.extend(head + "::" + p for p in expand(part))
    return out


PATH = re.compile(r"\b(crate|super)((?:::(?:\w+|\{[^;]*?\}))+)")

edges = defaultdict(set)
for module, code in files.items():
    for m in PATH.finditer(code):
        root, rest = m.group(1), m.group(2)
        for full in expand(rest.lstrip(":")):
            segments = [s for s in full.split("::") if s and s not in ("self", "*")]
            segments = [s.split(" as ")[0].strip() for s in segments]
            if root == "crate":
                target = resolve(segments)
            else:
                parent = module[:-1]
                target = resolve(list(parent) + segments)
            if target != module:
                edges[module].add(target)


def siblings_edge(a, b):
    """The two sibling modules through which `a` depends on `b`, if any."""
    common = 0
    while common < min(len(a), len(b)) and a[common] == b[common]:
        common += 1
    if common == len(a) or common == len(b):
        return None  # one holds the other
    return a[: common + 1], b[: common + 1]


groups = defaultdict(lambda: defaultdict(set))
for a, targets in edges.items():
    for b in targets:
        pair = siblings_edge(a, b)
        if pair:
            x, y = pair
            groups[x[:-1]][x].add(y)


def cycles(graph):
    """Every elementary cycle found by a depth-first search (one per back edge)."""
    found = []
    state = {}
    stack = []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


name = lambda m: "::".join(m) or "crate"
print("module dependencies (top level):")
top = groups[()]
for a in sorted(top):
    print(f"  {name(a):<12} -> {', '.join(name(b) for b in sorted(top[a]))}")
all_cycles = []
for parent in sorted(groups):
    for cycle in cycles(groups[parent]):
        all_cycles.append(cycle)
failed = False
if all_cycles:
    print(f"{len(all_cycles)} import cycle(s):")
    for cycle in all_cycles:
        print("  " + " -> ".join(name(m) for m in cycle))
    failed = True
else:
    print(f"no import cycle among {len(modules)} modules")

# The code map's order.
arch = os.path.join(os.path.dirname(os.path.abspath(SRC)), "ARCHITECTURE.md")
with open(arch, encoding="utf-8") as f:
    text = f.read()
code_map = text.split("## Code map", 1)[1].split("\n## ", 1)[0]
order = re.findall(r"^\| `(\w+)` \|", code_map, re.M)
rank = {m: i for i, m in enumerate(order)}
tops = {m[0] for m in modules if len(m) == 1}
for m in sorted(tops - set(rank)):
    print(f"module {m} is missing from the code map of ARCHITECTURE.md")
    failed = True
for m in sorted(set(rank) - tops):
    print(f"the code map of ARCHITECTURE.md names {m}, which is no module")
    failed = True
against = [
    (a, b)
    for a in sorted(top)
    for b in sorted(top[a])
    if a[0] in rank and b[0] in rank and rank[b[0]] < rank[a[0]]
]
for a, b in against:
    print(f"{name(a)} depends on {name(b)}, which the code map lists above it")
if against:
    failed = True
elif not failed:
    print(f"the {len(order)} modules of the code map depend only on those below them")
sys.exit(1 if failed else 0)
