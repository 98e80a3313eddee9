"""Build hook: everything declarative lives in pyproject.toml.

The CUDA C++ extension in csrc/ is built ahead of time as `mmgpt_engine._C` when nvcc and a
CUDA build of torch are present and MMGPT_BUILD_CUDA is not "0" (MMGPT_BUILD_CUDA=1 makes a
failed build an error; by default a failed build is reported and the install goes on without
it). Elsewhere `pip install .` installs the pure-Python package, and mmgpt_engine/ops/cuda.py
JIT-builds the extension on first use on a GPU machine. Either way the csrc/ sources are shipped
inside the package (mmgpt_engine/ops/_csrc) so that the JIT build also works from a wheel.

Building the extension needs torch at build time: `pip install --no-build-isolation .`.
The sources, flags and arch list are shared with the JIT path: mmgpt_engine/ops/_cuda_build.py.
"""
import importlib.util
import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_build_config():
    """mmgpt_engine/ops/_cuda_build.py loaded by path: importing the package would need torch."""
    spec = importlib.util.spec_from_file_location("_mmgpt_cuda_build", os.path.join(HERE, "mmgpt_engine", "ops",
                                                                                    "_cuda_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cfg = _load_build_config()


class build_py_with_csrc(build_py):
    """Copies csrc/ into the built package as mmgpt_engine/ops/_csrc (the JIT path's sources)."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads the checkout's csrc/ directly
        target = os.path.join(self.build_lib, "mmgpt_engine", "ops", "_csrc")
        os.makedirs(target, exist_ok=True)
        for name in cfg.SOURCES + cfg.HEADERS + cfg.CPU_SOURCES + cfg.CPU_HEADERS:
            os.makedirs(os.path.dirname(os.path.join(target, name)), exist_ok=True)
            shutil.copy2(os.path.join(HERE, "csrc", name), os.path.join(target, name))


def _note(message):
    print(f"mmgpt_engine setup: {message}", file=sys.stderr)


def _cuda_extension():
    """([the extension], {build_ext command}) when it can be built here, else ([], {})."""
    wanted = os.environ.get("MMGPT_BUILD_CUDA", "")
    if wanted == "0":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _note("torch is not importable at build time: pure-Python install (the cuda backend JIT-builds on first "
              "use; use --no-build-isolation to build it now)")
        return [], {}
    if torch.version.cuda is None:
        _note("torch is a CPU-only build: pure-Python install, no CUDA extension")
        return [], {}
    cuda_home = cfg.find_cuda_home()
    if cuda_home is None:
        _note("nvcc not found: pure-Python install (the cuda backend JIT-builds on first use where nvcc exists)")
        return [], {}
    os.environ.setdefault("CUDA_HOME", cuda_home)
    cpp_extension.CUDA_HOME = cuda_home  # see ops/cuda.py: torch may have guessed the root from a wrapper nvcc
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(cfg.parse_arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST")))
    extension = cpp_extension.CUDAExtension(
        name=cfg.AOT_MODULE,
        sources=[os.path.join("csrc", f) for f in cfg.SOURCES],
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": cfg.cxx_flags(), "nvcc": cfg.nvcc_flags()},
        optional=wanted != "1",
    )

    class build_ext_optional(cpp_extension.BuildExtension.with_options(use_ninja=True)):
        """torch's ninja build raises errors setuptools' `optional` does not catch: catch them here."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001 - any build failure of an optional extension
                if not getattr(ext, "optional", False):
                    raise
                _note(f"building {ext.name} failed, installing without it (the JIT path remains): {e}")

    return [extension], {"build_ext": build_ext_optional}


ext_modules, cmdclass = _cuda_extension()
cmdclass["build_py"] = build_py_with_csrc
setup(ext_modules=ext_modules, cmdclass=cmdclass)
