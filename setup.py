"""Build and install `incubation`.

The compiled extension `incubation._C` (sources in csrc/) is optional: when nothing can be
compiled the package installs as pure Python and `incubation.ops.backends()` says why the
extension is missing.

Environment:
  INCUBATION_SKIP_CUDA_BUILD=1   build the C++ (CPU) extension only
  INCUBATION_FORCE_CUDA=1        build the CUDA extension even if no GPU/toolchain is detected
  INCUBATION_SKIP_EXTENSION=1    build no extension at all
  INCUBATION_REQUIRE_EXTENSION=1 a failed compile of the extension fails the install (for CI)
  TORCH_CUDA_ARCH_LIST           CUDA archs (default "8.0;9.0+PTX")
  MAX_JOBS                       parallel compile jobs for ninja
"""
import glob
import os
import platform
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _find_cuda_home():
    """nvcc on PATH may be a wrapper in /usr/local/bin, which makes torch guess CUDA_HOME=/usr/local."""
    for cand in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if cand and os.path.exists(os.path.join(cand, "bin", "nvcc")):
            return cand
    return None


def _simd_flags():
    """The CPU kernels use ATen's AVX2 vectors on x86-64 (incubation.extension refuses to load
    the extension on a CPU without AVX2); elsewhere ATen's portable vectors."""
    if platform.machine().lower() in ("x86_64", "amd64"):
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"]
    return []


def _extensions():
    """Return (ext_modules, cmdclass); empty when the extension cannot or should not be built."""
    sources_cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    if _flag("INCUBATION_SKIP_EXTENSION") or not sources_cpp:
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("incubation: torch is not importable at build time; skipping the extension "
              "(use pip install --no-build-isolation)", file=sys.stderr)
        return [], {}

    cuda_home = _find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home
        cpp_extension.CUDA_HOME = cuda_home
    sources_cu = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")) + glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
    want_cuda = (not _flag("INCUBATION_SKIP_CUDA_BUILD")) and bool(sources_cu) and (
        _flag("INCUBATION_FORCE_CUDA") or (torch.version.cuda is not None and cuda_home is not None))
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")

    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    # no -std flag: torch.utils.cpp_extension adds the C++ standard its own headers need.
    # -g0: Python's own CFLAGS carry -g, and debug info for ATen's templates is most of the compile
    # (measured: 44 s -> 17 s of CPU for csrc/cpu/layer_norm.cpp); these flags come last, so they win
    cxx = ["-O3", "-g0", "-fopenmp"] + _simd_flags()
    define_macros = []
    if want_cuda:
        define_macros.append(("INCUBATION_WITH_CUDA", None))
        ext = cpp_extension.CUDAExtension(
            "incubation._C", sources_cpp + sources_cu, include_dirs=include_dirs,
            define_macros=define_macros, extra_link_args=["-fopenmp"],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]})
    else:
        ext = cpp_extension.CppExtension(
            "incubation._C", sources_cpp, include_dirs=include_dirs, define_macros=define_macros,
            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """A failed compile leaves a working pure-Python install (ops.backends() reports it)."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - any compiler/toolchain failure
                self._warn(exc)

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001
                self._warn(exc)

        @staticmethod
        def _warn(exc):
            if _flag("INCUBATION_REQUIRE_EXTENSION"):
                raise exc
            print(f"incubation: WARNING: building incubation._C failed ({exc}); "
                  "installing without the compiled extension", file=sys.stderr)

    return [ext], {"build_ext": OptionalBuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="incubation",
    version="0.1.0",
    description="Train large Vision Transformers cheaply by divide and conquer "
                "(Deep Incubation, LEMON, Apollo) on fused Triton/CUDA kernels",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists(os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["incubation", "incubation.*"]),
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "timm>=1.0",
        "numpy",
        "safetensors",
        "tqdm",
        "tensorboard",
        "matplotlib",
    ],
    extras_require={"dev": ["pytest", "hypothesis", "ninja"], "slurm": ["submitit>=1.5"]},
    entry_points={"console_scripts": ["incubation=incubation.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
