"""The committed stubs under ``teacher_server/_proto`` are exactly what ``protogen`` makes now."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from testkit import REPO

from teacher_server import protogen


def files_under(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts
    }


def test_committed_stubs_are_not_stale(tmp_path):
    fresh = tmp_path / "_proto"
    protogen.generate(fresh)
    committed, regenerated = files_under(protogen.OUTPUT_DIR), files_under(fresh)
    assert sorted(committed) == sorted(regenerated), "run `python -m teacher_server.protogen`"
    stale = [name for name in committed if committed[name] != regenerated[name]]
    assert not stale, f"stale stubs {stale}: run `python -m teacher_server.protogen`"


def test_stubs_import_from_the_package_and_describe_the_api():
    from teacher_server._proto.hoidistill.teacher.v1 import teacher_pb2, teacher_pb2_grpc

    grpc_source = Path(teacher_pb2_grpc.__file__).read_text()
    assert "from teacher_server._proto.hoidistill.teacher.v1 import teacher_pb2" in grpc_source
    service = teacher_pb2.DESCRIPTOR.services_by_name["TeacherService"]
    assert service.full_name == "hoidistill.teacher.v1.TeacherService"
    streaming = {m.name: (m.client_streaming, m.server_streaming) for m in service.methods}
    assert streaming == {"Score": (False, False), "ScoreStream": (True, True), "GetModelInfo": (False, False)}
    assert teacher_pb2.ItemStatus.Name(2) == "ITEM_STATUS_IMAGE_REQUIRED"


def test_cli_writes_where_asked(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "teacher_server.protogen", "--output", str(tmp_path / "out")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "hoidistill" / "teacher" / "v1" / "teacher_pb2_grpc.py").is_file()
    assert "teacher_pb2.py" in done.stdout


def test_no_protos_is_an_error(tmp_path):
    with pytest.raises(protogen.ProtoGenError, match=r"no \.proto files"):
        protogen.generate(tmp_path / "out", proto_root=tmp_path)


def test_import_rewrite():
    text = (
        "from hoidistill.teacher.v1 import teacher_pb2 as x\n"
        "import hoidistill.common.v1.types_pb2\n"
        "from grpc import y\n"
    )
    fixed = protogen._fix_imports(text, {"hoidistill"})
    assert fixed.splitlines() == [
        "from teacher_server._proto.hoidistill.teacher.v1 import teacher_pb2 as x",
        "import teacher_server._proto.hoidistill.common.v1.types_pb2",
        "from grpc import y",
    ]
