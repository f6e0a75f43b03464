#!/usr/bin/env python3
"""Fails when two modules of src/ import each other, directly or around a loop.

A module is one file (`src/proxy/http/mod.rs` is `proxy::http`). An edge A -> B is
any path in A's non-test code (`crate::...`, `super::...`, `self::...`, or a
sibling named bare in a `use`) that resolves to module B or an item inside it.
A parent's `mod child;` line is not an edge (declaring is not importing), but a
`pub use child::X` re-export is. Test code (`#[cfg(test)]` and what follows it at
the end of a file) is left out: a test may reach anywhere.

Usage: tools/module_cycles.py [src-dir] [--graph]
Exit 0 when the graph is acyclic, 1 with each cycle printed otherwise.
"""
import os
import re
import sys


def module_of(path, root):
    rel = os.path.relpath(path, root)[:-3].split(os.sep)
    if rel[-1] in ("mod", "lib", "main"):
        rel = rel[:-1]
    return tuple(rel)


def strip_tests(text):
    # Tests sit at the end of our files, after a `#[cfg(test)]` item.
    m = re.search(r"^\s*#\[cfg\(test\)\]\s*\n\s*(pub\s+)?mod\s+\w+\s*\{", text, re.M)
    text = text[: m.start()] if m else text
    text = re.sub(r"//[^\n]*", "", text)
    return text


def use_paths(text):
    """Every path a `use` tree names, expanded, plus inline `crate::`/`super::` paths."""
    paths = []
    for m in re.finditer(r"\buse\s+([^;]+);", text):
        paths.extend(expand(m.group(1).replace("\n", " ").replace(" ", "")))
    for m in re.finditer(r"\b((?:crate|super|self)(?:::\w+)+)", text):
        paths.append(m.group(1))
    return paths


def expand(tree):
    # a::{b, c::{d, e}} -> a::b, a::c::d, a::c::e
    depth, start = 0, None
    for i, ch in enumerate(tree):
        if ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                prefix = tree[:start]
                inner = tree[start + 1 : i]
                out, d, last = [], 0, 0
                parts = []
                for j, c in enumerate(inner):
                    if c == "{":
                        d += 1
                    elif c == "}":
                        d -= 1
                    elif c == "," and d == 0:
                        parts.append(inner[last:j])
                        last = j + 1
                parts.append(inner[last:])
                for p in parts:
                    if p:
                        out.extend(expand(prefix + p))
                return out
    return [tree.split(" as ")[0].split("as")[0] if "::" not in tree else re.sub(r"as\w+$", "", tree)]


def resolve(path, here, modules):
    parts = path.split("::")
    if parts[0] == "crate":
        base, rest = (), parts[1:]
    elif parts[0] == "super":
        base = here[:-1]
        rest = parts[1:]
        while rest and rest[0] == "super":
            base, rest = base[:-1], rest[1:]
    elif parts[0] == "self":
        base, rest = here, parts[1:]
    elif here + (parts[0],) in modules:
        base, rest = here, parts
    else:
        return None  # an external crate or std
    best = None
    for n in range(len(rest) + 1):
        cand = base + tuple(rest[:n])
        if cand in modules:
            best = cand
    return best


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    root = args[0] if args else os.path.join(os.path.dirname(__file__), "..", "src")
    files = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            if n.endswith(".rs"):
                p = os.path.join(dirpath, n)
                files[module_of(p, root)] = p
    files.pop(("main",), None)
    modules = set(files)
    graph = {m: set() for m in modules}
    for m, p in files.items():
        with open(p) as f:
            text = strip_tests(f.read())
        for path in use_paths(text):
            t = resolve(path, m, modules)
            if t is not None and t != m and t != ():
                # A child naming its ancestor's own items is an edge; naming a
                # descendant through the ancestor resolves to the descendant.
                graph[m].add(t)
    if "--graph" in sys.argv:
        for m in sorted(graph):
            print("::".join(m) or "crate", "->", ", ".join(sorted("::".join(t) for t in graph[m])))
    cycles = find_cycles(graph)
    for c in cycles:
        print("modules in one import cycle: " + ", ".join("::".join(x) for x in c))
    if cycles:
        print(f"{len(cycles)} import cycle(s) between modules of src/")
        return 1
    print(f"no import cycle between {len(modules)} modules of src/")
    return 0


def find_cycles(graph):
    # Tarjan's strongly connected components; one line per component.
    index, low, on, stack, out = {}, {}, set(), [], []
    counter = [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


if __name__ == "__main__":
    sys.exit(main())
