"""Test-session set-up shared by every test file."""
import contextlib
import fcntl
import io
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run under the interpreter on CPU tensors. Triton reads this
# when a kernel is decorated, so it must be set before anything imports incubation.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The dispatcher's measured decisions go to a fresh folder: tests neither read a developer's
# cache nor leave one behind.
os.environ.setdefault("INCUBATION_CACHE_DIR", tempfile.mkdtemp(prefix="incubation-test-cache-"))
# Under pytest-xdist (`make test` runs `pytest -n auto`) the workers share the cores: each gets
# its share of torch's intra-op threads instead of all of them (oversubscribed OpenMP spins).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // _WORKERS))
    # and so do the processes the tests start (the CLI's jobs, README snippets, benchmarks), unless
    # the test sets a count: on all cores each, beside the other workers, their threads would spin
    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))


def pytest_report_header(config):
    if not torch.cuda.is_available():
        return "no CUDA device: the tests marked gpu (the CUDA backends' combinations) are not collected"


def once_per_session(tmp_path_factory, name: str, make) -> Path:
    """The folder `name` that make(folder) fills, made once for the whole test session: under
    pytest-xdist the workers share it (in the session's common temporary root, under a lock), so
    that a costly module or session fixture whose tests the workers split between them (worksteal
    hands a worker the tail of another's queue) is not computed once per worker."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent   # each worker's basetemp is a folder of the session's
    folder, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)   # released when the file closes, also on an error
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def session_folder(tmp_path_factory):
    """`once_per_session` for the fixtures of a test file: session_folder(name, make) -> folder."""
    return lambda name, make: once_per_session(tmp_path_factory, name, make)


@pytest.fixture(scope="session")
def folder(tmp_path_factory):
    """A tiny ImageFolder data set for the CLI tests, as `--data` wants it ("folder:<root>"):
    root/{train,val}/<class>/*.png, three classes told apart by which third is bright. One for the
    session (the workers too: the runs they share name it)."""
    np = pytest.importorskip("numpy")
    image = pytest.importorskip("PIL.Image")

    def make(root):
        rng = np.random.default_rng(0)
        for split, n in (("train", 16), ("val", 6)):
            for c in range(3):
                os.makedirs(root / split / f"class{c}")
                for j in range(n):
                    img = rng.integers(0, 60, (16, 16, 3), dtype=np.uint8)
                    img[:, c * 5:(c + 1) * 5] += 150
                    image.fromarray(img).save(root / split / f"class{c}" / f"{j}.png")
    return f"folder:{once_per_session(tmp_path_factory, 'images', make)}"


@pytest.fixture(scope="session")
def tiny():
    """Options that make a training command of the `incubation` CLI tiny, quiet and CPU-bound
    (with the `folder` data set: 14 x 14 images, batches of 8)."""
    return ("--img-size", "14", "--batch-size", "8", "--no-progress", "--device", "cpu")


@pytest.fixture(scope="session")
def tiny_pipeline(folder, tiny):
    """The options of `incubation run` that the tests of the whole tiny pipeline share: K = 2, 16 of
    the 48 training images (a fixed draw; 2 steps an epoch: every stage still trains, evaluates and
    saves)."""
    return ("--data", folder, "--modules", "2", "--limit-train", "16", *tiny)


@pytest.fixture(scope="session")
def tiny_run(tiny_pipeline, run_cli, tmp_path_factory):
    """(run directory, what it printed) of one `incubation run` with the tiny_pipeline options, run
    once in the session (`once_per_session`) for the tests that read it (test_cli checks its stages
    and report; test_pipeline compares the other ways of running with it). The eager backend and one
    thread, as test_pipeline's other ways run: no measured kernel choice, and the same float sums in
    every job."""
    def make(directory):
        printed = io.StringIO()
        with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
            patch.setenv("INCUBATION_BACKEND", "eager")
            patch.setenv("OMP_NUM_THREADS", "1")
            assert run_cli("run", "--out", directory / "run", *tiny_pipeline) == 0
        (directory / "printed.txt").write_text(printed.getvalue())
    directory = once_per_session(tmp_path_factory, "tiny-run", make)
    return directory / "run", (directory / "printed.txt").read_text()


@pytest.fixture(scope="session")
def run_cli():
    """`incubation ARGV...` in this process: a function of the arguments (any objects, passed as
    strings to incubation.cli.main) returning its exit status."""
    from incubation import cli

    def run(*argv):
        return cli.main([str(a) for a in argv])
    return run


@pytest.fixture
def source_checkpoint(tmp_path):
    """A function that saves a small ViT (14 x 14 images, patch 7, 3 classes, 32 wide, depth 2)
    as a finished `stage` (default e2e) checkpoint at tmp_path / "src", and returns the model."""
    from incubation import VisionTransformer, ViTConfig
    from incubation.train.checkpoint import save_checkpoint

    def save(stage="e2e"):
        cfg = ViTConfig(img_size=14, patch_size=7, in_chans=3, num_classes=3, embed_dim=32, depth=2, num_heads=2)
        torch.manual_seed(0)
        model = VisionTransformer(cfg)
        key = "meta_config" if stage == "meta" else "target_config"
        save_checkpoint(str(tmp_path / "src"), model.state_dict(), {"stage": stage, key: cfg.to_dict()})
        return model
    return save


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A single-node Slurm cluster for the session, started by scripts/slurm-up.sh (which installs
    Debian's slurm-wlm and munge as root when missing) and stopped by PID by scripts/slurm-down.sh,
    also when tests fail; SLURM_CONF points at it meanwhile. Skips with the script's reason where
    it cannot start, unless INCUBATION_REQUIRE_SLURM=1 (CI) makes that a failure."""
    scripts = Path(__file__).resolve().parents[1] / "scripts"
    directory = tmp_path_factory.mktemp("slurm")
    down = ["bash", str(scripts / "slurm-down.sh"), str(directory)]
    up = subprocess.run(["bash", str(scripts / "slurm-up.sh"), str(directory)], capture_output=True, text=True,
                        timeout=900)
    if up.returncode != 0:
        subprocess.run(down, timeout=120)  # whatever did start
        reason = (up.stderr.strip().splitlines() or ["no message"])[-1]
        if os.environ.get("INCUBATION_REQUIRE_SLURM") == "1":
            pytest.fail(f"the test Slurm cluster did not start: {reason}")
        pytest.skip(f"no Slurm cluster: {reason}")
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(directory / "slurm.conf")
    try:
        yield directory
    finally:
        subprocess.run(down, timeout=120)
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous


# the test files that take longest on CPU (measured with --durations), longest first; the two
# Slurm files stay next to each other (one worker, one test cluster)
LONGEST_FIRST = ("test_study.py", "test_slurm_pipeline.py", "test_slurm.py", "test_readme.py", "test_benchmarks.py",
                 "test_cli.py", "test_pipeline.py", "test_compile_check.py")


def _keep(config, items, keep):
    """Deselect (pytest reports them so) the items for which keep(item) is false."""
    dropped = [item for item in items if not keep(item)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if keep(item)]


@pytest.hookimpl(trylast=True)  # after -m / -k have deselected
def pytest_collection_modifyitems(config, items):
    """Without a CUDA device the tests marked gpu (the CUDA backends' combinations of the tests
    written once for every backend, and the CUDA-only tests) are left out rather than skipped one
    by one; a machine with CUDA collects them (benchmarks/gpu.sh: pytest -m gpu).

    INCUBATION_TEST_SHARD=i/n keeps shard i of n (0-based), so that n pytest processes can
    share the work (benchmarks/gpu.sh: on a fresh GPU the tests wait mostly on Triton compiling
    kernels, one process per core). The tests of one function in one dtype stay together (they
    compile the same kernels); those groups go, largest first, to the shard with fewest tests."""
    if not torch.cuda.is_available():
        _keep(config, items, lambda item: not item.get_closest_marker("gpu"))
    # the files with the longest tests first, each file kept whole (its module fixtures run once):
    # xdist's workers then end on short tests instead of one waiting for the study at the tail
    # (a fixture that worksteal's split of a file would compute on both workers: once_per_session)
    first = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))
    shard = os.environ.get("INCUBATION_TEST_SHARD")
    if not shard:
        return
    index, count = (int(v) for v in shard.split("/"))
    if not 0 <= index < count:
        raise pytest.UsageError(f"INCUBATION_TEST_SHARD={shard!r}: want i/n with 0 <= i < n")
    groups = {}
    for item in items:
        callspec = getattr(item, "callspec", None)
        dtype = callspec.params.get("dtype") if callspec else None
        groups.setdefault((item.nodeid.split("[")[0], str(dtype)), []).append(item)
    load, keep = [0] * count, set()
    for _, group in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        target = load.index(min(load))
        load[target] += len(group)
        if target == index:
            keep.update(item.nodeid for item in group)
    _keep(config, items, lambda item: item.nodeid in keep)
