"""serve-ray's refusals before Ray starts: a wrong export, builder arguments, a port in use.

Its own module: test_ray.py keeps a Ray instance up for the whole module, and these must see none.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from http_helpers import bank


def test_a_wrong_export_options_or_port_fail_before_ray_starts(tmp_path_factory, tmp_path):
    """serve-ray checks the export, the builder's arguments and the port first: one "Error:" line and exit 2/1,
    with no Ray instance started (before, a non-bank export failed inside every replica Ray kept restarting, and
    the "serving ..." line was printed first)."""
    import socket

    from click.testing import CliRunner

    from bca_deploy.cli import main
    from bca_deploy.errors import ServingError
    from bca_deploy.serving.ray import build_app

    art = bank("bert", tmp_path_factory)
    (tmp_path / "bca_export.json").write_text('{"task": "feature-extraction", "merged": true, "bank": null}')
    (tmp_path / "model.onnx").write_bytes(b"")
    assert not ray.is_initialized()
    result = CliRunner().invoke(main, ["serve-ray", str(tmp_path)])
    assert result.exit_code == 2 and "is not an adapter-bank graph (exported merged without --bank)" in result.output
    assert "serving" not in result.output and "Traceback" not in result.output, result.output
    (tmp_path / "bca_export.json").write_text('{"task": "feature-extraction", "bank": {"slots": 3}}')
    result = CliRunner().invoke(main, ["serve-ray", str(tmp_path)])
    assert result.exit_code == 2 and "bank.slots must be a list" in result.output, result.output
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(main, ["serve-ray", str(art["onnx"]), "--port", str(port)])
    assert result.exit_code == 1 and f"cannot listen on 127.0.0.1:{port}" in result.output, result.output
    assert not ray.is_initialized()
    for args, needle in (({"export_dir": str(art["onnx"]), "replicas": "two"}, "replicas: expected an integer >= 1"),
                         ({"export_dir": str(art["onnx"]), "replicas": "0"}, "replicas: expected an integer >= 1"),
                         ({"export_dir": str(art["onnx"]), "replica_cpus": "nan"}, "replica_cpus: expected a number"),
                         ({"export_dir": str(art["onnx"]), "max_batch_rows": "many"}, "max_batch_rows: expected an integer"),
                         ({"export_dir": str(art["onnx"]), "adapter_store": str(tmp_path / "none")}, "adapter_store:"),
                         ({}, "export_dir: required")):
        with pytest.raises(ServingError, match=needle):
            build_app(args)
