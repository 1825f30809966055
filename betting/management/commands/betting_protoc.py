"""Regenerate betting/grpc/generated/ from betting/grpc/betting.proto (package-qualified)."""

from pathlib import Path
from typing import Any

import grpc_tools
from django.core.management.base import BaseCommand, CommandError
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[3]


class Command(BaseCommand):
    help = "Regenerate the betting gRPC code with grpc_tools.protoc."

    def handle(self, *args: Any, **options: Any) -> None:
        proto_include = Path(grpc_tools.__file__).parent / "_proto"
        # The proto is mapped to betting/grpc/generated/betting.proto so generated imports read
        # `from betting.grpc.generated import betting_pb2`.
        args_ = [
            "protoc",
            f"-I{proto_include}",
            f"-Ibetting/grpc/generated={ROOT / 'betting' / 'grpc'}",
            f"--python_out={ROOT}",
            f"--pyi_out={ROOT}",
            f"--grpc_python_out={ROOT}",
            str(ROOT / "betting" / "grpc" / "betting.proto"),
        ]
        if protoc.main(args_) != 0:
            raise CommandError("protoc failed")
        self.stdout.write("generated betting/grpc/generated/")
