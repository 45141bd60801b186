"""Imported first by ``sparsediff/__init__.py``: see :func:`attach_sibling_folders`."""

from __future__ import annotations

_PACKAGE = __name__.rpartition(".")[0]


def attach_sibling_folders() -> None:
    """Make the top-level ``kernels/`` and ``pipelines/`` folders importable as ``sparsediff.kernels`` /
    ``sparsediff.pipelines`` wherever this package is imported from its source tree.

    Those folders have no ``__init__.py`` on purpose: as regular packages they would shadow another
    distribution's top-level module (Hugging Face's ``kernels``) whenever Python runs from the repo root.
    They are namespace sub-packages instead. A wheel installs them inside this package's folder, where the
    normal import system finds them and this function does nothing; setuptools' editable finder (and a
    plain source checkout on ``PYTHONPATH``) leaves them next to ``sparsediff/``, and that finder does not
    resolve a namespace sub-package of a regular package, so we create the namespace module here.
    """
    import importlib.machinery
    import importlib.util
    import os
    import sys

    here = os.path.dirname(os.path.abspath(__file__))  # .../sparsediff
    for name in ("kernels", "pipelines"):
        full = f"{_PACKAGE}.{name}"
        inside, beside = os.path.join(here, name), os.path.join(os.path.dirname(here), name)
        if full in sys.modules or os.path.isdir(inside) or not os.path.isdir(beside):
            continue
        spec = importlib.machinery.ModuleSpec(full, None, is_package=True)
        spec.submodule_search_locations = [beside]
        sys.modules[full] = module = importlib.util.module_from_spec(spec)
        setattr(sys.modules[_PACKAGE], name, module)


attach_sibling_folders()
