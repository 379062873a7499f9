"""marlwatch's start-up hook, run by `site` in every Python process of a watched command.

`marlwatch run -- COMMAND` puts this directory first on the command's PYTHONPATH (children
inherit it, as they inherit MARLWATCH_ADDRESS), so processes that never import marlwatch (a
vector env's workers, a subprocess) still get the auto phases and connect on first use. The
same pattern as coverage.py's process start-up hook and OpenTelemetry's auto-instrumentation.

It does nothing unless MARLWATCH_ADDRESS is set, never raises, and costs an environment look-up
(plus, with MARLWATCH_AUTO_PHASES=1, an import hook: libraries are patched when the program
imports them, never imported here). Then it runs the `sitecustomize` this one shadows, if there
is one later on sys.path, as if this directory were not there.
"""


def _start() -> None:
    import os

    if not os.environ.get("MARLWATCH_ADDRESS") or os.environ.get("MARLWATCH_AUTO_PHASES") != "1":
        return
    try:
        import importlib

        from marlwatch import autophases

        autophases.install(lambda: importlib.import_module("marlwatch.instrument"))
    except Exception as e:  # noqa: BLE001 - a start-up hook must never stop the program
        import sys

        try:
            sys.stderr.write(f"marlwatch: warning: auto phases not installed: {type(e).__name__}: {e}\n")
        except Exception:  # noqa: BLE001
            pass


def _chain() -> None:
    """Run the next `sitecustomize` on sys.path (a distribution's or a virtualenv's), which
    `site` would have run without us. Its errors are its own: `site` reports them as usual."""
    import importlib.machinery
    import importlib.util
    import os
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["sitecustomize"] = module  # it is the sitecustomize from now on
    spec.loader.exec_module(module)


_start()
_chain()
