#!/usr/bin/env python3
"""The layout rules of docs/architecture.md, checked on the sources (CI runs this).

1. No import cycle among the modules of any crate: neither among its files (each file
   is a module) nor among its top-level modules (a folder and everything in it count as
   one). A module uses another when its code names it or an item it defines
   (`crate::a::b`, `super::x`, or an item the crate root or a `mod.rs` re-exports).
2. No function longer than MAX_FN_LINES lines outside tests, and no source file longer
   than MAX_FILE_LINES lines outside its test module (generated code aside).
3. The crates' arrows (ARROWS): a crate names only the crates of ours it may use, in its
   Cargo.toml and in its code (sources, tests, build script); the coordinator names the
   worker crate only in the modules that run ranks in its own process (LOCAL_LAUNCH).
4. The CUDA backend uses nothing of the CPU backend (kernels: `cuda` -> `cpu`).
5. Crate roots (lib.rs) only declare modules and re-export: no item defined there (the
   tests crate, the whole-system tests' helpers, aside).

Test modules (`#[cfg(test)]` to the end of a file, and files `tests.rs` or `*_tests.rs`)
and comments are not read.
usage: scripts/check-layout.py [MAX_FN_LINES]   (default 150)
"""
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CRATES = ["kernels", "alloc", "core", "worker", "coordinator", "proto", "tests"]
MAX_FN_LINES = int(sys.argv[1]) if len(sys.argv) > 1 else 150
MAX_FILE_LINES = 800
# What each crate of ours may use (besides itself): bottom to top.
ARROWS = {
    "kernels": set(),
    "proto": set(),
    "alloc": {"kernels"},
    "core": {"kernels", "alloc", "proto"},
    "worker": {"kernels", "alloc", "core", "proto"},
    "coordinator": {"kernels", "alloc", "core", "proto", "worker"},
    "tests": {"kernels", "alloc", "core", "proto", "worker", "coordinator"},
}
# The coordinator's modules that run a rank's work in this process (`train` in one
# process, `worker`, `eval`, `sample`, `tables`, `bench`): the only ones that may name the
# worker crate.
LOCAL_LAUNCH = {
    os.path.join("coordinator", "src", "commands", f + ".rs")
    for f in ("train", "worker", "eval", "sample", "tables", "bench")
}


def strip(text):
    """Code without comments, string contents and the test module."""
    i = text.find("#[cfg(test)]")
    if i >= 0:
        text = text[:i]
    out = []
    for line in text.split("\n"):
        # Comments to the end of the line (a `//` inside a string is rare in this code
        # and only hides part of that line).
        j = line.find("//")
        out.append(line if j < 0 else line[:j])
    code = "\n".join(out)
    return re.sub(r'"(?:[^"\\\n]|\\.)*"', '""', code)


def modules(src):
    """Module path (tuple) -> file, for one crate's src directory."""
    mods = {}
    for dirpath, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, f), src)[:-3].split(os.sep)
            if rel in (["lib"], ["main"]):
                path = ()
            elif rel[-1] == "mod":
                path = tuple(rel[:-1])
            else:
                path = tuple(rel)
            if rel == ["main"] and () in mods:
                continue
            mods[path] = os.path.join(dirpath, f)
    return mods


def reexports(code):
    """Names a module re-exports from its child modules: name -> child."""
    out = {}
    for m in re.finditer(r"pub use (?:self::)?([a-z_0-9]+)::(\{[^;]*\}|[A-Za-z_0-9]+)\s*;", code, re.S):
        child, names = m.group(1), m.group(2)
        for n in re.findall(r"[A-Za-z_][A-Za-z_0-9]*", names):
            out[n] = child
    return out


def uses(path, code, mods, exports):
    """Modules module `path` uses."""
    found = set()

    def resolve(parts):
        # The longest known module prefix; an item re-exported there leads to its source.
        best = ()
        for k in range(len(parts), -1, -1):
            if tuple(parts[:k]) in mods:
                best = tuple(parts[:k])
                break
        rest = parts[len(best):]
        while rest and rest[0] in exports.get(best, {}):
            child = best + (exports[best][rest[0]],)
            if child not in mods:
                break
            best = child
        return best

    def expand(prefix, tree):
        # `a::{b, c::{d, e}}` -> [a::b, a::c::d, a::c::e]
        tree = tree.strip()
        if tree.startswith("{") and tree.endswith("}"):
            inner, depth, cur, items = tree[1:-1], 0, "", []
            for ch in inner:
                if ch == "," and depth == 0:
                    items.append(cur)
                    cur = ""
                    continue
                depth += ch == "{"
                depth -= ch == "}"
                cur += ch
            items.append(cur)
            out = []
            for it in items:
                it = it.strip()
                if not it:
                    continue
                m = re.match(r"([A-Za-z_0-9:]*?)(::)?(\{.*\})$", it, re.S)
                if m and m.group(3):
                    out += expand(prefix + [p for p in m.group(1).split("::") if p], m.group(3))
                else:
                    out.append(prefix + [p for p in it.split(" as ")[0].split("::") if p])
            return out
        return [prefix + [p for p in tree.split(" as ")[0].split("::") if p]]

    paths = []
    for m in re.finditer(r"\buse\s+(crate|super|self)::([^;]*);", code, re.S):
        base = m.group(1)
        paths += [(base, p) for p in expand([], m.group(2))]
    for m in re.finditer(r"\b(crate|super)((?:::[A-Za-z_][A-Za-z_0-9]*)+)", code):
        paths.append((m.group(1), [p for p in m.group(2).split("::") if p]))
    for base, parts in paths:
        if base == "crate":
            full = parts
        else:
            parent = list(path)[:-1] if base == "super" else list(path)
            while parts and parts[0] == "super":
                parent, parts = parent[:-1], parts[1:]
            full = parent + parts
        target = resolve([p for p in full if p != "self"])
        # A module's own submodules are part of it (it declares them, may re-export them).
        if target[: len(path)] != path:
            found.add(target)
    return found


def cycles(graph):
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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

    sys.setrecursionlimit(10000)
    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def long_functions(file, code):
    out = []
    lines = code.split("\n")
    for i, line in enumerate(lines):
        m = re.match(r"\s*(?:pub(?:\([a-z]+\))?\s+)?(?:async\s+)?(?:unsafe\s+)?(?:const\s+)?fn\s+([a-z_0-9]+)", line)
        if not m:
            continue
        depth, started = 0, False
        for j in range(i, len(lines)):
            for ch in lines[j]:
                if ch == "{":
                    depth += 1
                    started = True
                elif ch == "}":
                    depth -= 1
            if started and depth == 0:
                n = j - i + 1
                if n > MAX_FN_LINES:
                    out.append(f"{os.path.relpath(file, ROOT)}:{i + 1}: fn {m.group(1)} has {n} lines (max {MAX_FN_LINES})")
                break
            if not started and lines[j].rstrip().endswith(";"):
                break
    return out


def crate_arrows():
    """Rule 3: the crates of ours each crate names, in Cargo.toml and in code."""
    out = []
    for crate, allowed in ARROWS.items():
        root = os.path.join(ROOT, crate)
        manifest = open(os.path.join(root, "Cargo.toml")).read()
        for dep in sorted(set(re.findall(r"^lightrnn-([a-z]+)\b", manifest, re.M)) - allowed - {crate}):
            out.append(f"{crate}/Cargo.toml: depends on lightrnn-{dep}, which {crate} may not use")
        for dirpath, _, files in os.walk(root):
            if "/target" in dirpath or "/generated" in dirpath:
                continue
            for f in files:
                if not f.endswith(".rs"):
                    continue
                file = os.path.join(dirpath, f)
                rel = os.path.relpath(file, ROOT)
                named = set(re.findall(r"\blightrnn_([a-z]+)::", strip(open(file).read())))
                for dep in sorted(named - allowed - {crate}):
                    out.append(f"{rel}: uses lightrnn_{dep}, which {crate} may not use")
                if crate == "coordinator" and "worker" in named and rel.startswith(os.path.join("coordinator", "src")) and rel not in LOCAL_LAUNCH:
                    out.append(f"{rel}: uses lightrnn_worker outside the local-launch modules")
    return out


def long_file(file, code):
    n = code.count("\n") + 1
    if n > MAX_FILE_LINES and "/generated/" not in file:
        return [f"{os.path.relpath(file, ROOT)}: {n} lines outside tests (max {MAX_FILE_LINES})"]
    return []


def thin_root(crate, file, code):
    """Rule 5: a crate root declares modules and re-exports, nothing more."""
    m = re.search(r"^\s*(?:pub(?:\([a-z]+\))?\s+)?(fn|struct|enum|trait|impl|const|static|type)\b", code, re.M)
    if m:
        return [f"{os.path.relpath(file, ROOT)}: a crate root defines an item ({m.group(1)}); move it to a module"]
    return []


def main():
    problems = crate_arrows()
    for crate in CRATES:
        src = os.path.join(ROOT, crate, "src")
        if not os.path.isdir(src):
            continue
        mods = modules(src)
        codes = {p: strip(open(f).read()) for p, f in mods.items()}
        exports = {p: reexports(c) for p, c in codes.items()}
        graph = {p: uses(p, c, mods, exports) for p, c in codes.items()}
        for comp in cycles(graph):
            problems.append(f"{crate}: modules that use each other: " + " <-> ".join("::".join(c) or "(root)" for c in comp))
        top = {}
        for p, targets in graph.items():
            if not p:
                continue
            for t in targets:
                if t and t[0] != p[0]:
                    top.setdefault(p[0], set()).add(t[0])
        for comp in cycles(top):
            problems.append(f"{crate}: top-level modules that use each other: " + " <-> ".join(comp))
        if crate == "kernels":
            for p, targets in sorted(graph.items()):
                if p[:1] == ("cuda",) and any(t[:1] == ("cpu",) for t in targets):
                    problems.append(f"kernels: {mods[p]} uses the CPU backend (cuda -> cpu)")
        # The tests crate is the whole-system tests' helpers, not a library of the product.
        if crate != "tests" and () in mods and mods[()].endswith("lib.rs"):
            problems += thin_root(crate, mods[()], codes[()])
        for p, f in mods.items():
            # Generated code, and test modules in files of their own (tests.rs, *_tests.rs).
            name = os.path.basename(f)
            if "/generated/" in f or name == "tests.rs" or name.endswith("_tests.rs"):
                continue
            problems += long_functions(f, codes[p])
            problems += long_file(f, codes[p])
    for p in problems:
        print(p)
    if problems:
        sys.exit(1)
    print(
        f"layout ok: no module cycles, no function over {MAX_FN_LINES} lines and no file over "
        f"{MAX_FILE_LINES} lines outside tests, the crates' arrows, cuda apart from cpu, thin crate roots"
    )


if __name__ == "__main__":
    main()
