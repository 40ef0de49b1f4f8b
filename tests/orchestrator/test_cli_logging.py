"""``lorafleet``'s logging: a library warning prints once, in our format (huggingface_hub printed each twice)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# A subcommand whose run() logs as the libraries do while a model loads.
COMMAND = '''
import logging

HELP = "log like the libraries"


def add_arguments(parser):
    pass


def run(args):
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as tf_logging

    hub_logging.get_logger("huggingface_hub.utils._http").warning("hub says retry")
    tf_logging.get_logger("transformers.modeling_utils").warning("transformers says hello")
    logging.getLogger("orchestrator.x").info("ours says hi")
    return 0
'''


def run_cli(tmp_path: Path, **env: str) -> str:
    (tmp_path / "logcmd.py").write_text(COMMAND)
    code = ("import sys; from orchestrator import cli; cli.COMMANDS['logcmd'] = ('logcmd', 'x'); "
            "sys.exit(cli.main(['logcmd']))")  # fmt: skip
    full = {key: value for key, value in os.environ.items() if key != "CI"}
    full.update(PYTHONPATH=os.pathsep.join([str(REPO), str(tmp_path)]), **env)
    res = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stderr


def test_a_hub_warning_prints_once_in_our_format(tmp_path):
    err = run_cli(tmp_path)
    hub = [line for line in err.splitlines() if "hub says retry" in line]
    assert len(hub) == 1, err
    assert " WARNING huggingface_hub.utils._http: hub says retry" in hub[0]
    assert sum("transformers says hello" in line for line in err.splitlines()) == 1, err
    assert " INFO orchestrator.x: ours says hi" in err


def test_transformers_in_ci_prints_once(tmp_path):
    """With CI=1 transformers propagates its records to the root as well as printing them itself."""
    err = run_cli(tmp_path, CI="1")
    assert sum("transformers says hello" in line for line in err.splitlines()) == 1, err
    assert sum("hub says retry" in line for line in err.splitlines()) == 1, err


def test_rays_per_call_package_lines_are_quiet_and_its_warnings_are_not(monkeypatch):
    """Every client call printed Ray's `INFO dashboard_sdk.py:371 -- Uploading package gcs://...` (its
    modules set their loggers to INFO when imported, after the CLI set up logging). Checked at the
    logger (what reaches any handler), whatever handlers and configs earlier tests left."""
    from orchestrator import cli

    cli.setup_logging(False)
    from ray.dashboard.modules import dashboard_sdk

    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    monkeypatch.setattr(dashboard_sdk.logger, "disabled", False)  # a logging config of another test may have disabled it
    handler = Keep(logging.DEBUG)
    dashboard_sdk.logger.addHandler(handler)
    try:
        dashboard_sdk.logger.info("Uploading package gcs://_ray_pkg_x.zip.")
        dashboard_sdk.logger.warning("a warning of Ray's")
    finally:
        dashboard_sdk.logger.removeHandler(handler)
    assert seen == ["a warning of Ray's"]
