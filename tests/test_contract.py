"""The pdlb.v1 contract: generated code is fresh, and the protos follow the project's style."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from pdlb.protogen import generate, proto_files

ROOT = Path(__file__).resolve().parents[1]
PROTO = ROOT / "proto"
GENERATED = ROOT / "src" / "pdlb" / "v1"


def test_generated_code_is_not_stale(tmp_path):
    generate(PROTO, tmp_path)
    fresh = tmp_path / "pdlb" / "v1"
    names = sorted(p.name for p in fresh.iterdir() if p.is_file())
    committed = sorted(p.name for p in GENERATED.iterdir() if p.is_file())
    assert names == committed, "run `make proto`: the set of generated files differs"
    _same, mismatch, errors = filecmp.cmpfiles(fresh, GENERATED, names, shallow=False)
    assert not mismatch and not errors, f"run `make proto`: stale generated files {mismatch + errors}"


def test_generated_code_imports_without_path_tricks():
    code = (
        "import pdlb.v1.dispatch_pb2_grpc, pdlb.v1.scheduler_pb2_grpc, pdlb.v1.bootstrap_pb2_grpc, "
        "pdlb.v1.load_report_pb2_grpc"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


@pytest.fixture(scope="module")
def descriptors(tmp_path_factory) -> descriptor_pb2.FileDescriptorSet:
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("desc") / "set.pb"
    files = [str(p.relative_to(PROTO)) for p in proto_files(PROTO)]
    assert protoc.main(["protoc", f"-I{PROTO}", "--include_source_info", f"--descriptor_set_out={out}", *files]) == 0
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _commented_paths(file: descriptor_pb2.FileDescriptorProto) -> set[tuple[int, ...]]:
    return {tuple(loc.path) for loc in file.source_code_info.location if loc.leading_comments.strip()}


def test_every_service_rpc_message_field_and_enum_value_is_documented(descriptors):
    missing = []
    for file in descriptors.file:
        assert file.package == "pdlb.v1"
        documented = _commented_paths(file)
        for si, service in enumerate(file.service):
            if (6, si) not in documented:
                missing.append(f"service {service.name}")
            missing += [
                f"rpc {service.name}.{m.name}"
                for mi, m in enumerate(service.method)
                if (6, si, 2, mi) not in documented
            ]
        for mi, message in enumerate(file.message_type):
            if (4, mi) not in documented:
                missing.append(f"message {message.name}")
            missing += [
                f"field {message.name}.{f.name}"
                for fi, f in enumerate(message.field)
                if (4, mi, 2, fi) not in documented
            ]
        for ei, enum in enumerate(file.enum_type):
            missing += [f"enum value {v.name}" for vi, v in enumerate(enum.value) if (5, ei, 2, vi) not in documented]
    assert not missing, f"undocumented: {missing}"


def test_enums_start_unspecified_and_rpcs_have_their_own_messages(descriptors):
    used: dict[str, str] = {}
    for file in descriptors.file:
        for enum in file.enum_type:
            first = enum.value[0]
            assert first.number == 0 and first.name.endswith("_UNSPECIFIED"), enum.name
        for service in file.service:
            for method in service.method:
                for type_name in (method.input_type, method.output_type):
                    owner = f"{service.name}.{method.name}"
                    assert used.setdefault(type_name, owner) == owner, f"{type_name} shared by {owner}"
