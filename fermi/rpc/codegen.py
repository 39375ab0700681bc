"""Regenerate the checked-in stubs in ``fermi/rpc/generated`` from the .proto.

Run ``python -m fermi.rpc.codegen`` after editing ``proto/fermi/v1/fermi.proto`` (needs
grpcio-tools). protoc writes ``from fermi.v1 import fermi_pb2``, which would resolve against
this package's own ``fermi``; the import is rewritten to a relative one so the stubs work
as the ``fermi.rpc.generated`` package.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parents[2] / "proto"
PROTO = "fermi/v1/fermi.proto"
GENERATED = Path(__file__).resolve().parent / "generated"
FILES = ("fermi_pb2.py", "fermi_pb2.pyi", "fermi_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Write the stubs for :data:`PROTO` into ``out_dir``; return the files written."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            PROTO,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO_ROOT / PROTO}")
        for name in FILES:
            text = (Path(tmp) / Path(PROTO).parent / name).read_text()
            text = text.replace("from fermi.v1 import fermi_pb2", "from . import fermi_pb2")
            target = out_dir / name
            target.write_text(text)
            written.append(target)
    return written


if __name__ == "__main__":
    for path in generate(GENERATED):
        print(path, file=sys.stderr)
