"""Start-up hook: registers CflowPlus with anomalib, and its error report with anomalib's CLI, when they load.

``anomalib_cflow_plus_hook.pth`` imports this module at interpreter start. It imports nothing but ``sys`` and puts
a finder on ``sys.meta_path`` that wraps the loading of:

- ``anomalib.models``: once it has loaded, ``anomalib_cflow_plus.lightning_model`` is imported, which makes
  ``CflowPlus`` a known ``AnomalibModule`` subclass (for ``anomalib train --model CflowPlus`` and ``get_model``)
  and an attribute of ``anomalib.models`` (for YAML ``class_path: CflowPlus``). When a module of the plugin is
  what loads ``anomalib.models`` (e.g. ``import anomalib_cflow_plus.torch_model`` first), that waits until the
  plugin's modules being loaded have finished;
- ``anomalib.cli.cli``: once it has loaded (and installed rich's traceback hook), the plugin's one-message report of
  user errors goes in front of rich's hook, in the ``anomalib`` command only (see ``anomalib_cflow_plus.errors``).

The finder leaves the meta path once CflowPlus is registered and the CLI module has loaded.
"""

import sys

PLUGIN_MODULE = "anomalib_cflow_plus"
MODELS_MODULE = "anomalib.models"
CLI_MODULE = "anomalib.cli.cli"
PENDING = {MODELS_MODULE, CLI_MODULE}  # what the finder still waits for
_loading_plugin_modules = [0]  # how many plugin modules are being executed now; a registration waits for them


def register() -> None:
    """Import the plugin's Lightning module (which registers ``CflowPlus``), unless plugin modules are loading."""
    if _loading_plugin_modules[0]:
        return  # registered when they are done (anomalib.models stays pending until then)
    PENDING.discard(MODELS_MODULE)
    __import__(f"{PLUGIN_MODULE}.lightning_model")


def report_cli_errors() -> None:
    """In anomalib's command line, print a user error of the plugin as its message alone, not as a traceback."""
    PENDING.discard(CLI_MODULE)
    from anomalib_cflow_plus.errors import install_cli_report, running_anomalib_cli

    if running_anomalib_cli():
        install_cli_report()


def _after_plugin_module() -> None:
    _loading_plugin_modules[0] -= 1
    if not _loading_plugin_modules[0] and MODELS_MODULE in PENDING and MODELS_MODULE in sys.modules:
        register()


class AnomalibModelsFinder:
    """Meta-path finder that wraps the loading of anomalib's models and CLI modules, and of the plugin's own."""

    resolving: set = set()  # noqa: RUF012  (names being looked up now: the lookup below comes back here)

    @classmethod
    def find_spec(cls, fullname: str, path: object = None, target: object = None) -> object:
        """Return the module's own spec, with a loader that runs the module's hook around its execution."""
        plugin = fullname == PLUGIN_MODULE or fullname.startswith(f"{PLUGIN_MODULE}.")
        watched = fullname in PENDING or (plugin and MODELS_MODULE in PENDING)
        if not watched or fullname in cls.resolving:
            return None
        from importlib.util import find_spec

        cls.resolving.add(fullname)
        try:
            spec = find_spec(fullname)
        finally:
            cls.resolving.discard(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_with_hooks(module: object) -> None:
            if plugin:
                _loading_plugin_modules[0] += 1
                try:
                    exec_module(module)
                finally:
                    _after_plugin_module()
                return
            exec_module(module)
            register() if fullname == MODELS_MODULE else report_cli_errors()
            if not PENDING and cls in sys.meta_path:
                sys.meta_path.remove(cls)

        spec.loader.exec_module = exec_with_hooks
        return spec


def install() -> None:
    """Put the finder first on ``sys.meta_path``; for a module loaded already, run its hook at once."""
    if CLI_MODULE in sys.modules:
        report_cli_errors()
    if MODELS_MODULE in sys.modules:
        register()
    if PENDING and AnomalibModelsFinder not in sys.meta_path:
        sys.meta_path.insert(0, AnomalibModelsFinder)


install()
