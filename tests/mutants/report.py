"""Score of the last `make mutants` run, per module: reads mutmut's results (mutants/**/*.meta),
counts a mutant as killed when a test failed on it (or it timed out), and prints every survivor,
and every mutant no selected test reaches, that tests/mutants/equivalent.md does not justify.
Exit status 1 when there is one: each survivor is killed by a new test or listed there with its
reason.

    .venv/bin/python tests/mutants/report.py            # after `make mutants`
    .venv/bin/python tests/mutants/report.py --prepare  # before `mutmut run` (make mutants does it)
    .venv/bin/python tests/mutants/report.py --widen    # after mutmut recorded its test map (ditto)
    .venv/bin/python tests/mutants/report.py --sample tests/mutants/sample.txt  # a sampled run's scores
    .venv/bin/mutmut show NAME                          # the diff of one mutant

`--prepare` keeps the kills and the survivors justified in equivalent.md (mutmut itself clears a
function's verdicts when the function changes) and clears every other verdict, so survivors meet
the tests added since; it drops mutmut's test-to-function map, so mutmut records it afresh (mutmut
3.8.1 extends an old map only with new tests: a module that moved would have no tests at all).
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EQUIVALENT = Path(__file__).with_name("equivalent.md")
# mutmut's exit codes (mutmut/stats.py): a failing test is 1 (3: pytest's internal error, also a
# kill); 0 survived; 5 and 33 no test reaches the function; 36, 24, -24, 152, 255 timeouts.
KILLED, SURVIVED, NO_TESTS, TIMEOUT = {1, 3}, {0}, {5, 33}, {36, 24, -24, 152, 255}


def results(root: Path) -> dict[str, dict[str, int | None]]:
    """{module path: {mutant name: exit code}} of every mutated module."""
    out = {}
    for meta in sorted((root / "mutants").rglob("*.py.meta")):
        module = str(meta.relative_to(root / "mutants"))[: -len(".meta")]
        out[module] = json.loads(meta.read_text())["exit_code_by_key"]
    return out


def justified(path: Path) -> set[str]:
    """Mutant names listed in equivalent.md (each in backquotes, with its reason on the line)."""
    return set(re.findall(r"`([\w.ǁ]+__mutmut_\d+)`", path.read_text())) if path.is_file() else set()


def status(code: int | None) -> str:
    if code in KILLED or code in TIMEOUT:
        return "killed"
    if code in SURVIVED:
        return "survived"
    if code in NO_TESTS:
        return "no tests"
    return "not run" if code is None else f"exit {code}"


def prepare(root: Path) -> None:
    (root / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)
    keep = justified(EQUIVALENT)  # a survivor justified there stays one until its function changes
    for meta in (root / "mutants").rglob("*.py.meta"):
        data = json.loads(meta.read_text())
        codes = data["exit_code_by_key"]
        data["exit_code_by_key"] = {k: (c if status(c) == "killed" or k in keep else None) for k, c in codes.items()}
        meta.write_text(json.dumps(data))


# Modules whose functions run in the training loader's worker processes, and the tests that read
# through such a loader (not the tests that only call them in-process, which mutmut maps itself:
# the fewer gloo groups a clean-test pass leaves behind, the less often a loader worker forked
# after them hangs). mutmut maps a function to the tests that call it by recording calls in the
# test process only: a function a worker runs is mapped to the few tests that call it directly, and
# its mutants "survive" the rest (a mixing weight dropped, read only by test_data_mix's workers).
LOADER_MODULES = ("sd_train.data.stream.", "sd_train.data.tar.", "sd_train.data.decode.")
LOADER_TESTS = (
    "test_data.py",
    "test_data_meta.py",
    "test_data_mix.py",
    "test_data_buckets.py",
    "test_data_elastic.py",
    "test_decode.py",
    "test_buckets.py",
    "test_geometry.py",
    "test_sdxl_data.py",
    "test_frozen_encoders.py",
)


def widen(root: Path) -> int:
    """Map every function of LOADER_MODULES to every test of LOADER_TESTS in mutmut's recorded
    map (mutants/mutmut-stats.json, after a first `mutmut run` recorded it). Returns how many."""
    path = root / "mutants" / "mutmut-stats.json"
    stats = json.loads(path.read_text())
    tests = {t for t in stats["duration_by_test"] if t.split("::")[0].rsplit("/", 1)[-1] in LOADER_TESTS}
    by_function = stats["tests_by_mangled_function_name"]
    functions = {
        re.sub(r"__mutmut_\d+$", "", name)
        for codes in results(root).values()
        for name in codes
        if name.startswith(LOADER_MODULES)
    }
    for function in functions:
        by_function[function] = sorted(set(by_function.get(function, [])) | tests)
    path.write_text(json.dumps(stats))
    return len(functions)


def sample_scores(root: Path, names_file: Path) -> int:
    """The score of each module over a random sample of its mutants (the names in `names_file`,
    `#` lines skipped), with its 95% Wilson interval: killed / (sample - justified equivalents)."""
    names = [n for line in names_file.read_text().splitlines() if not line.startswith("#") for n in line.split()]
    by_module, equivalent = results(root), justified(EQUIVALENT)
    print(f"{'module':<30} {'sample':>6} {'killed':>6} {'equivalent':>10} {'survived':>8} {'not run':>7}  score [95%]")
    for module, codes in by_module.items():
        picked = [n for n in names if n in codes]
        if not picked:
            continue
        states = [status(codes[n]) for n in picked]
        killed, not_run = states.count("killed"), states.count("not run")
        eq = sum(1 for n, st in zip(picked, states) if n in equivalent and st != "killed")
        scored = len(picked) - eq - not_run
        lo, hi = wilson(killed, scored) if scored else (0.0, 0.0)
        score = f"{killed / scored:.1%} [{lo:.0%}, {hi:.0%}]" if scored else "-"
        print(f"{module:<30} {len(picked):>6} {killed:>6} {eq:>10} {scored - killed:>8} {not_run:>7}  {score}")
    return 0


def main() -> int:
    if sys.argv[1:] == ["--prepare"]:
        prepare(REPO)
        return 0
    if sys.argv[1:] == ["--widen"]:
        print(f"{widen(REPO)} loader-side functions mapped to every loader test")
        return 0
    if sys.argv[1:2] == ["--sample"] and len(sys.argv) == 3:
        return sample_scores(REPO, Path(sys.argv[2]))
    by_module = results(REPO)
    if not by_module:
        print("no mutmut results under mutants/: run `make mutants` first")
        return 2
    equivalent = justified(EQUIVALENT)
    unjustified: list[tuple[str, str]] = []
    seen: set[str] = set()
    print(
        f"{'module':<30} {'mutants':>7} {'not run':>7} {'killed':>7} {'equivalent':>10} {'survived':>8} "
        f"{'no tests':>8} {'score':>6}"
    )
    totals: Counter = Counter()
    for module, codes in by_module.items():
        # A listed equivalent counts as equivalent only, also when it was not run (a sampled run).
        counts = Counter(status(c) for n, c in codes.items() if not (n in equivalent and c is None))
        eq = sum(1 for name, c in codes.items() if name in equivalent and status(c) != "killed")
        seen |= set(codes)
        for name, c in codes.items():
            if status(c) not in ("killed", "not run") and name not in equivalent:
                unjustified.append((name, status(c)))
        scored = len(codes) - eq
        totals.update(mutants=len(codes), not_run=counts["not run"], killed=counts["killed"], equivalent=eq)
        totals.update(survived=counts["survived"], no_tests=counts["no tests"], scored=scored)
        row(module, len(codes), counts["not run"], counts["killed"], eq, counts["survived"], counts["no tests"], scored)
    t = totals
    row("all", t["mutants"], t["not_run"], t["killed"], t["equivalent"], t["survived"], t["no_tests"], t["scored"])
    print("score = killed / (mutants - equivalent): a timeout counts as killed, a mutant not run yet as not;")
    print("of those run = killed / (run - equivalent), with its 95% Wilson interval, for a random sample")
    stale = sorted(equivalent - {n for n in seen if status(by_module_code(by_module, n)) != "killed"})
    if stale:
        print(f"\n{len(stale)} entries of {EQUIVALENT.name} are killed now or no longer exist (remove them):")
        print("\n".join(f"  {n}" for n in stale))
    if unjustified:
        print(f"\n{len(unjustified)} survivors not justified in {EQUIVALENT.relative_to(REPO)} (`mutmut show NAME`):")
        print("\n".join(f"  {name}  ({why})" for name, why in sorted(unjustified)))
        return 1
    return 0


def row(name: str, mutants: int, not_run: int, killed: int, eq: int, survived: int, no_tests: int, scored: int) -> None:
    score = f"{killed / scored:.1%}" if scored else "-"
    line = f"{name:<30} {mutants:>7} {not_run:>7} {killed:>7} {eq:>10} {survived:>8} {no_tests:>8} {score:>6}"
    run = scored - not_run
    if not_run and run > 0:  # a partial or sampled run: the score of the mutants run, and its 95% interval
        lo, hi = wilson(killed, run)
        line += f"  of those run: {killed / run:.1%} [{lo:.0%}, {hi:.0%}]"
    print(line)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of k successes in n trials: the score of a module from a random
    sample of its mutants (`mutmut run NAME ...`), when a full run does not fit the time."""
    p, d = k / n, 1 + z * z / n
    centre, half = (p + z * z / (2 * n)) / d, z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / d
    return max(0.0, centre - half), min(1.0, centre + half)


def by_module_code(by_module: dict[str, dict[str, int | None]], name: str) -> int | None:
    for codes in by_module.values():
        if name in codes:
            return codes[name]
    return None


if __name__ == "__main__":
    sys.exit(main())
