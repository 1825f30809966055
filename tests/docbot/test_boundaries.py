"""The bot package reaches data only through the backend API and the queue."""

import ast
from pathlib import Path

import docbot.bot

BOT_DIR = Path(docbot.bot.__file__).parent
FORBIDDEN = ("django.db", "docbot.models", "docbot.services", "docbot.selectors", "knox")


def test_bot_package_imports_no_models_and_no_database_layer() -> None:
    offenders = []
    for source in BOT_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{source.name}: {name}" for name in names if name.startswith(FORBIDDEN)]
    assert offenders == []
