"""Generate the Python code of the pdlb.v1 contract with grpcio-tools (`make proto`).

Kept inside the package so the staleness test regenerates with exactly the same options.
"""

from __future__ import annotations

import sys
from pathlib import Path


def proto_files(proto_dir: Path) -> list[Path]:
    """All .proto files of the contract, sorted for a stable order."""
    return sorted((proto_dir / "pdlb" / "v1").glob("*.proto"))


def generate(proto_dir: Path, out_dir: Path) -> None:
    """Write *_pb2.py, *_pb2.pyi and *_pb2_grpc.py for every proto file under out_dir/pdlb/v1."""
    import grpc_tools
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    include = Path(grpc_tools.__file__).parent / "_proto"
    files = [str(p.relative_to(proto_dir)) for p in proto_files(proto_dir)]
    (out_dir / "pdlb" / "v1").mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{proto_dir}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed for {files}")
    init = out_dir / "pdlb" / "v1" / "__init__.py"
    init.write_text('"""Generated code of the pdlb.v1 protobuf contract (`make proto`). Do not edit."""\n')


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    proto_dir, out_dir = (Path(a) for a in [*argv, "proto", "src"][:2])
    generate(proto_dir, out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
