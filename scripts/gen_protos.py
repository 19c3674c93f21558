"""Generate the Python modules and type stubs of protos/ into rlhf_mesh/v1/.

    python scripts/gen_protos.py          # regenerate
    python scripts/gen_protos.py --check  # exit 1 when the checked-in code differs
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE = Path("rlhf_mesh") / "v1"
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def generate(out_root: Path) -> list[Path]:
    """Run protoc with the grpc and mypy plugins; return the generated files."""
    bindir = Path(sys.executable).parent
    protos = sorted((PROTO_ROOT / PACKAGE).glob("*.proto"))
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{resources.files('grpc_tools') / '_proto'}",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *map(str, protos),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(p for p in (out_root / PACKAGE).iterdir() if p.name.endswith(SUFFIXES))


def drift() -> list[str]:
    """Names of generated files that differ from, or are missing in, the checked-in package."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name: p for p in generate(Path(tmp))}
        current = {p.name: p for p in (ROOT / PACKAGE).iterdir() if p.name.endswith(SUFFIXES)}
        names = sorted(fresh.keys() | current.keys())
        return [
            n for n in names
            if n not in fresh or n not in current or not filecmp.cmp(fresh[n], current[n], shallow=False)
        ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail when the checked-in code is stale")
    if parser.parse_args().check:
        stale = drift()
        if stale:
            raise SystemExit(f"generated code is stale, run `make protos`: {', '.join(stale)}")
        print("generated code is up to date")
        return
    target = ROOT / PACKAGE
    for old in target.iterdir():
        if old.name.endswith(SUFFIXES):
            old.unlink()
    with tempfile.TemporaryDirectory() as tmp:
        for path in generate(Path(tmp)):
            shutil.copy(path, target / path.name)
            print(f"wrote {PACKAGE / path.name}")


if __name__ == "__main__":
    main()
