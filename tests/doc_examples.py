"""A check shared by the pipeline tests: a pipeline's ``__call__`` docstring carries a usable example."""

from __future__ import annotations

import ast
import builtins
import inspect
import re


def check_call_example(pipeline_cls) -> None:
    doc = pipeline_cls.__call__.__doc__
    assert "Examples:" in doc
    example = doc.split("Examples:", 1)[1]
    assert "```py" in example and ">>> " in example
    assert f"{pipeline_cls.__name__}.from_pretrained" in example
    # every keyword the example passes to the pipeline exists in the signature
    calls = re.findall(r"pipe\((.*?)\)\n", example.replace("\n        ...", ""), re.S)
    assert calls
    keywords = {keyword for call in calls for keyword in re.findall(r"(\w+)=", call)}
    assert keywords and keywords <= set(inspect.signature(pipeline_cls.__call__).parameters)
    # the example is valid Python and every name it uses is imported or assigned in it
    code = "\n".join(line.strip()[4:] for line in example.splitlines() if line.strip().startswith((">>> ", "... ")))
    tree = ast.parse(code)
    defined = {alias.asname or alias.name.split(".")[0] for node in ast.walk(tree)
               if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
    defined |= {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)}
    used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}
    assert used - defined - set(dir(builtins)) == set()
