import subprocess
import sys


def test_policies_import_no_torch_ray_numpy():
    code = (
        "import pkgutil, importlib, sys, policies\n"
        "for m in pkgutil.iter_modules(policies.__path__):\n"
        "    importlib.import_module('policies.' + m.name)\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('torch', 'ray', 'numpy', 'actors', 'orchestrator'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
