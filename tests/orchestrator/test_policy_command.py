"""``lorafleet policy show`` prints YAML that ``policy set`` reads back, refuses an argument, and a
policy ``set`` that the head cannot import names the file once (not ``policy: policy:``)."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from orchestrator import cli
from orchestrator.controller import Controller


def test_policy_show_prints_yaml_that_policy_set_reads_back(cli_controller: Controller, capsys, tmp_path: Path):
    path = tmp_path / "pol.yaml"
    path.write_text("policy: aspen\nmargin: 0.2\nquotas: {default: 2, alice: 4}\n")
    assert cli.main(["policy", "set", str(path)]) == 0
    capsys.readouterr()
    assert cli.main(["policy", "show"]) == 0
    shown = capsys.readouterr().out
    assert shown == "policy: aspen\nmargin: 0.2\nquotas:\n  default: 2\n  alice: 4\n"
    again = tmp_path / "again.yaml"
    again.write_text(shown)
    cli_controller.set_policy({"policy": "fifo"})
    assert cli.main(["policy", "set", str(again)]) == 0
    assert cli_controller.get_policy()["config"] == {"policy": "aspen", "margin": 0.2,
                                                     "quotas": {"default": 2, "alice": 4}}  # fmt: skip


def test_policy_show_of_a_custom_policy_keeps_its_name_as_a_comment(cli_controller: Controller, capsys):
    cli_controller.set_policy({"policy": "tests.policies.custom_policy:FirstIdle", "options": {"label": "mine"}})
    assert cli.main(["policy", "show"]) == 0
    out = capsys.readouterr().out
    assert out == "policy: tests.policies.custom_policy:FirstIdle\noptions:\n  label: mine\n# its name: mine\n"
    assert yaml.safe_load(out) == {"policy": "tests.policies.custom_policy:FirstIdle", "options": {"label": "mine"}}


def test_policy_show_refuses_an_argument(cli_controller: Controller, capsys):
    assert cli.main(["policy", "show", "extra"]) == 2
    assert capsys.readouterr().err == ("lorafleet policy: error: policy show: takes no argument (got 'extra'); it "
                                       "prints the controller's policy\n")  # fmt: skip


def test_a_policy_the_head_cannot_import_names_the_file_once(cli_controller: Controller, capsys, tmp_path: Path,
                                                             monkeypatch):  # fmt: skip
    """This machine imports mypol (it parses the file before connecting); the head does not."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "mypol.py").write_text("from tests.policies.custom_policy import FirstIdle as Pol\n")
    monkeypatch.syspath_prepend(str(code))
    path = tmp_path / "pol.yaml"
    path.write_text("policy: mypol:Pol\n")
    real = cli_controller.set_policy

    def on_the_head(doc, **kwargs):
        monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(code)])
        monkeypatch.delitem(sys.modules, "mypol", raising=False)
        return real(doc, **kwargs)

    monkeypatch.setattr(cli_controller, "set_policy", on_the_head)
    assert cli.main(["policy", "set", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lorafleet policy: error: {path}: on the head: policy: cannot import module 'mypol': "
                          "No module named 'mypol' (this machine imports it, the head does not: install it on the "
                          "head or put it on the head's PYTHONPATH)")  # fmt: skip
    assert "policy: policy:" not in err and err.count("\n") == 1
