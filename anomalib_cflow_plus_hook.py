"""Start-up hook: registers CflowPlus with anomalib when, and only when, ``anomalib.models`` is imported.

``anomalib_cflow_plus_hook.pth`` imports this module at interpreter start. It imports nothing but
``sys`` and puts a one-shot finder on ``sys.meta_path``. When ``anomalib.models`` is first imported,
the finder lets it load as usual and then imports ``anomalib_cflow_plus``, which makes ``CflowPlus``
a known ``AnomalibModule`` subclass (for ``anomalib train --model CflowPlus`` and ``get_model``) and an
attribute of ``anomalib.models`` (for YAML ``class_path: CflowPlus``).
"""

import sys

TARGET_MODULE = "anomalib.models"
PLUGIN_MODULE = "anomalib_cflow_plus"


def register(models_module: object) -> None:
    """Import the plugin and expose ``CflowPlus`` on ``anomalib.models``."""
    plugin = sys.modules.get(PLUGIN_MODULE)
    if plugin is not None and not hasattr(plugin, "CflowPlus"):
        return  # the plugin itself is being imported; it registers itself when it is done
    __import__(PLUGIN_MODULE)
    models_module.CflowPlus = sys.modules[PLUGIN_MODULE].CflowPlus


class AnomalibModelsFinder:
    """One-shot meta-path finder that wraps the loading of ``anomalib.models``."""

    @classmethod
    def find_spec(cls, fullname: str, path: object = None, target: object = None) -> object:
        """Return ``anomalib.models``' own spec with a loader that registers the plugin afterwards."""
        if fullname != TARGET_MODULE:
            return None
        sys.meta_path.remove(cls)
        from importlib.util import find_spec

        spec = find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module: object) -> None:
            exec_module(module)
            register(module)

        spec.loader.exec_module = exec_and_register
        return spec


def install() -> None:
    """Put the finder first on ``sys.meta_path``, or register at once if anomalib.models is already loaded."""
    if TARGET_MODULE in sys.modules:
        register(sys.modules[TARGET_MODULE])
    elif AnomalibModelsFinder not in sys.meta_path:
        sys.meta_path.insert(0, AnomalibModelsFinder)


install()
