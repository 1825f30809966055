"""A custom import-linter contract: apps talk to each other only through services/selectors.

`protected` contracts need every protected module to exist already; this one protects whatever
an app grows, so a new module is covered the day it is written.
"""

from typing import Any

from importlinter import Contract, ContractCheck, fields, output


class AppBoundaryContract(Contract):
    type_name = "app_boundary"

    apps = fields.ListField(subfield=fields.StringField())
    public_modules = fields.ListField(subfield=fields.StringField())
    allowed_importers = fields.ListField(subfield=fields.StringField())

    def check(self, graph: Any, verbose: bool) -> ContractCheck:
        apps: list[str] = list(self.apps)  # type: ignore[call-overload]
        public: list[str] = list(self.public_modules)  # type: ignore[call-overload]
        trusted: list[str] = list(self.allowed_importers)  # type: ignore[call-overload]
        illegal: list[str] = []
        for importer in sorted(graph.modules):
            importer_root = importer.split(".")[0]
            if importer_root in trusted:
                continue
            for imported in sorted(graph.find_modules_directly_imported_by(importer)):
                imported_root = imported.split(".")[0]
                if imported_root not in apps or imported_root == importer_root:
                    continue
                allowed = {imported_root} | {f"{imported_root}.{name}" for name in public}
                if imported in allowed or any(
                    imported.startswith(f"{a}.") for a in allowed - {imported_root}
                ):
                    continue
                lines = graph.get_import_details(importer=importer, imported=imported)
                numbers = ", ".join(str(detail["line_number"]) for detail in lines)
                illegal.append(f"{importer} -> {imported} (l.{numbers})")
        return ContractCheck(kept=not illegal, metadata={"illegal": illegal})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for line in check.metadata["illegal"]:
            output.print_error(f"- {line}", bold=False)
            output.new_line()
