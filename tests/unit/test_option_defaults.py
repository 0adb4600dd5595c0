"""The defaults module.py declares are those the code falls back to.

module.py imports mgr_module and cannot be imported outside ceph-mgr, and
its option defaults are literals (the mgr and the docs read them as such),
so they are parsed here and compared with the values the code holds."""
import ast
from dataclasses import fields
from pathlib import Path
from typing import Any, Dict

from rbd_migration.limits import SourceLimits
from rbd_migration.settings import DEFAULT_CONFIG_KEY_PREFIXES, Settings

MODULE = Path(__file__).resolve().parents[2] / 'rbd_migration' / 'module.py'


def _defaults() -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for node in ast.walk(ast.parse(MODULE.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, 'id', '') == 'Option':
            kw = {k.arg: k.value for k in node.keywords}
            out[ast.literal_eval(node.args[0])] = ast.literal_eval(kw['default'])
    return out


def test_source_limits_defaults_match() -> None:
    defaults = _defaults()
    for f in fields(SourceLimits):
        assert defaults[SourceLimits.option_name(f.name)] == f.default, f.name


def test_config_key_prefixes_default_matches() -> None:
    assert _defaults()['config_key_prefixes'] == DEFAULT_CONFIG_KEY_PREFIXES


def test_settings_defaults_match() -> None:
    """Every option module.py declares has its typed field, with the same
    default, and nothing else does."""
    defaults = _defaults()
    assert {f.name: f.default for f in fields(Settings)} == defaults


def test_settings_are_read_typed() -> None:
    given = {'max_concurrent_tasks': '4', 'retry_backoff': 2, 'keep_copy_buffers': True,
             'file_source_roots': '/a:/b:', 'http_redirect_origins': 'https://x https://y'}
    s = Settings.read(given.get)
    assert (s.max_concurrent_tasks, s.retry_backoff, s.keep_copy_buffers) == (4, 2.0, True)
    assert isinstance(s.retry_backoff, float) and s.file_roots == ['/a', '/b']
    assert s.redirect_origins == ['https://x', 'https://y'] and s.probe_timeout == 60.0
    assert s.retry_policy.backoff == 2.0 and s.source_limits == SourceLimits()

