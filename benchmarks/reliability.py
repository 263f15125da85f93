"""The bad-input and fault campaign (issue 17), run as the test files that hold it, and written
up as docs/RELIABILITY.md: what is probed, how, and the counts of the last run.

    python benchmarks/reliability.py [--out docs/RELIABILITY.md]

Every probe is a test case (a hypothesis property counts once, with its examples drawn inside
it). "handled cleanly" = the test passed: the right number, or a clear error naming the
problem and no traceback for a user's fault; "failures" = anything else (a wrong answer, a
crash, a traceback). Skipped cases (GPU-only) are counted apart, never as handled.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (area, what is probed and how, test file, pytest -k expression or None for the whole file)
AREAS = [
    ("ops: numbers", "hypothesis properties of every op on every CPU backend against eager: shapes (zero-size "
     "included), dtypes, strides, NaN/Inf; 1-D parameters sliced / expanded; second derivatives "
     "(gradgradcheck in float64, Hessian-vector products against float64)",
     ["tests/test_ops_properties.py", "tests/test_backend_properties.py", "tests/test_backend_contracts.py"], None),
    ("ops: bad input", "wrong shapes, dtypes, devices, scale/eps, head dim 0: a ValueError/TypeError naming the "
     "argument", ["tests/test_ops.py"], None),
    ("model edges", "ViTConfig field types and values, empty batches (timm's shape), mlp_ratio giving 0 units",
     ["tests/test_vit.py"], None),
    ("training faults", "divergence (lr 1e6, NaN injected), non-finite checkpoints at every load, strict JSON, "
     "umask 022/077, a second writer on a run dir, a SIGKILLed lock holder",
     ["tests/test_reliability_engine.py"], None),
    ("checkpoints", "corrupt, edited and missing files, crashes at every step of the commit protocol, "
     "SIGKILL + resume bit-identical", ["tests/test_engine.py"], "checkpoint or sigkill or resume"),
    ("data", "corrupt / truncated / fuzzed IDX files, a killed download, stale temporary files, no copy and no "
     "network, ImageFolder symlink loops, mismatched class sets, corrupt images and decompression bombs",
     ["tests/test_data.py"], None),
    ("command line", "every numeric option of every subcommand with 0, -1, nan, inf and '' (exit 2, no "
     "traceback), disk full, read-only / permission / not-a-directory outputs, no CUDA device, failed parallel "
     "jobs", ["tests/test_cli_errors.py", "tests/test_cli.py", "tests/test_growth_cli.py"], None),
    # issue 25's probe campaign (some of its tests are counted in the areas above too)
    ("issue 25: command line", "an output that is an input (prefix, suffix, relative path, symlink, hard link), "
     "unknown --aa policies, prefixes of options, expand on 16 kinds of weights that do not match their recorded "
     "config, --num-heads that does not divide the width, grow with too few steps, folder data's own image size "
     "and eval split; absurd sizes, non-float weights, damaged final.json, pickled state files; children of a "
     "SIGKILLed parent", ["tests/test_cli_probes.py", "tests/test_cli_errors.py", "tests/test_weights.py",
                          "tests/test_jobs.py"],
     "test_cli_probes or absurd_sizes or non_float or damaged_final or unpickle or head_counts or sigkilled_parent"),
    ("issue 25: new users", "every README snippet run as written; data found beside the checkout and in "
     "INCUBATION_CACHE_DIR; the report's margin, 'no clear winner', varying stage times and next steps",
     ["tests/test_readme.py", "tests/test_report.py", "tests/test_data.py"],
     "test_readme or test_report or cache_dir or beside"),
    ("issue 25: ops", "eager attention on overlapping as_strided views and NaN queries, the ViT on the meta "
     "device, sizes beyond memory, layer norm of rows far from zero and of huge rows, measuring inside activation "
     "checkpointing, a Triton linear output changed in place", ["tests/test_ops.py", "tests/test_vit.py",
                                                                 "tests/test_kernels.py", "tests/test_dispatch.py",
                                                                 "tests/test_triton_linear.py"],
     "overlapping_views or nan_query or meta_device or sizes_beyond or far_from_zero or huge_rows or "
     "inside_activation_checkpointing or in_place_then_backward"),
    ("local launcher", "SIGTERM / SIGINT to the parent of running jobs (one of them ignoring both), SIGKILL of "
     "the parent, the fork server killed under a job, exit statuses (codes, messages, tracebacks, signals), "
     "what a forked job gets (environment, cwd, threads, seeds, argv, stdin); jobs as processes and as forks",
     ["tests/test_jobs.py"], "signal_to_the_parent or sigkilled or forked or fork_server_dies"),
]


def run_area(files: list[str], expr: str | None) -> dict:
    """Run the area's tests; counts from pytest's JUnit XML."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "junit.xml")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *files]
        if expr:
            cmd += ["-k", expr]
        env = dict(os.environ)
        shared = os.path.join(os.path.dirname(REPO), "shared", "data", "fashion-mnist")
        if "INCUBATION_DATA_DIR" not in env and os.path.isdir(shared):   # as `make test` does
            env["INCUBATION_DATA_DIR"] = shared
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
        if not os.path.exists(xml):
            raise RuntimeError(f"pytest did not run {files}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        cases = {}   # test id -> skipped / failure / handled
        for case in ET.parse(xml).getroot().iter("testcase"):
            outcome = {child.tag for child in case}
            cases[f"{case.get('classname')}::{case.get('name')}"] = (
                "skipped" if "skipped" in outcome else "failure" if outcome & {"failure", "error"} else "handled")
        return counts(cases)


def counts(cases: dict) -> dict:
    """tried / handled / failures / skipped of {test id: outcome}, and the failed ids."""
    n = {o: sum(v == o for v in cases.values()) for o in ("handled", "failure", "skipped")}
    return {"tried": n["handled"] + n["failure"], "handled": n["handled"], "failures": n["failure"],
            "skipped": n["skipped"], "failed": sorted(k for k, v in cases.items() if v == "failure"), "cases": cases}


def markdown(results: list[tuple], elapsed: float) -> str:
    # areas share some tests: the totals count each test case once
    total = counts({case: outcome for *_, r in results for case, outcome in r["cases"].items()})
    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    lines = [
        "# Reliability: what is probed, and the last run", "",
        "Regenerate with `python benchmarks/reliability.py` (writes this file). Every probe is a test "
        "case of the CI suite: \"handled cleanly\" means the right number, or a clear error naming the "
        "problem (one line and a non-zero exit on the command line); a failure is a wrong answer, a "
        "crash or a traceback for a user's fault. Hypothesis properties count once each (25-30 examples "
        "drawn inside; `INCUBATION_PROPERTY_EXAMPLES` raises it). Skipped cases (GPU-only ones on a CPU "
        "machine, the real data set where none is configured) are counted apart, never as handled.", "",
        f"Last run: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit}, "
        f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), {elapsed:.0f} s.", "",
        "| area | what is probed, and how | tried | handled cleanly | failures | skipped |",
        "|---|---|---|---|---|---|",
    ]
    for area, how, files, _, r in results:
        lines.append(f"| {area} | {how} ({', '.join(f'`{f}`' for f in files)}) | {r['tried']} | {r['handled']} | "
                     f"{r['failures']} | {r['skipped']} |")
    lines.append(f"| **all** (each test case once) | | **{total['tried']}** | **{total['handled']}** | "
                 f"**{total['failures']}** | {total['skipped']} |")
    failed = total["failed"]
    lines += ["", "Failures: " + ("none." if not failed else ""), *[f"- {f}" for f in failed], ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--out", default=os.path.join(REPO, "docs", "RELIABILITY.md"))
    args = p.parse_args(argv)
    start = datetime.datetime.now()
    results = []
    for area, how, files, expr in AREAS:
        r = run_area(files, expr)
        print(f"{area}: tried {r['tried']}, handled {r['handled']}, failures {r['failures']}, skipped {r['skipped']}")
        results.append((area, how, files, expr, r))
    text = markdown(results, (datetime.datetime.now() - start).total_seconds())
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {args.out}")
    return 1 if any(r["failures"] for *_, r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
