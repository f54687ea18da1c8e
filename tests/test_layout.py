"""The README's layout block lists exactly the package's modules, and the package keeps its import rules."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "diffusers_retina"


def _readme_modules():
    text = (ROOT / "README.md").read_text()
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    modules, folder = set(), ""
    for line in block.splitlines():
        if line.startswith("diffusers_retina/"):
            continue
        if not line.startswith("  "):  # the package block ends at the first top-level folder
            if modules:
                break
            continue
        head = re.match(r"  (\w+)/\s", line)
        if head:
            folder = head.group(1) + "/"
        elif re.match(r"  \w+\.py", line):
            folder = ""
        modules.update(folder + name for name in re.findall(r"(?<![\w/])((?:\w+/)*\w+\.py)\b", line))
    return modules


def _package_modules():
    return {path.relative_to(PACKAGE).as_posix() for path in PACKAGE.rglob("*.py")
            if "__pycache__" not in path.parts and path.name != "__init__.py"}


def test_readme_layout_lists_every_module():
    listed, present = _readme_modules(), _package_modules()
    assert listed == present, (f"in the package, not in README's layout: {sorted(present - listed)}; "
                               f"in README's layout, not in the package: {sorted(listed - present)}")


def _imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            yield node, node.level, node.module or ""
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node, 0, alias.name


def test_image_processing_and_utils_import_no_other_package_module():
    """The leaf packages: the image processor and the io helpers import nothing else from diffusers_retina."""
    for folder in ("image_processing", "utils"):
        for path in (PACKAGE / folder).rglob("*.py"):
            for _, level, module in _imports(path):
                assert level <= 1 and not module.startswith("diffusers_retina"), f"{path.name} imports {module}"


def test_nothing_imports_the_cli_dispatcher_and_library_code_never_imports_the_cli():
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE).as_posix()
        for _, level, module in _imports(path):
            absolute = module if level == 0 else None
            if relative.startswith("cli/"):
                if relative not in ("cli/__init__.py", "cli/__main__.py"):
                    assert not (level == 1 and module == "main"), f"{relative} imports cli.main"
                continue
            assert not (absolute or "").startswith("diffusers_retina.cli"), f"{relative} imports the CLI"
            assert not (level >= 1 and module.split(".")[0] == "cli"), f"{relative} imports the CLI"


def test_no_module_imports_the_package_inside_a_function():
    """Imports inside functions were how import circles were dodged; package imports live at module top."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for function in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(function):
                if isinstance(node, ast.ImportFrom) and node.level >= 1:
                    offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} from {'.' * node.level}{node.module}")
    assert not offenders, offenders


def test_no_test_module_imports_another():
    """Test modules share dummy components through ``testing_utils`` (and the pipeline tests their tester mixin),
    never through one another or through conftest."""
    tests = ROOT / "tests"
    offenders = []
    for path in tests.rglob("*.py"):
        for _, level, module in _imports(path):
            name = module.split(".")[-1] if module else ""
            if name == "test_pipelines_common" and path.parent.parent.name == "pipelines":
                continue  # the tester mixin, as in diffusers
            if name.startswith("test_") or name in ("conftest", "doc_examples"):
                offenders.append(f"{path.relative_to(tests)} imports {'.' * level}{module}")
    assert not offenders, offenders


def test_no_package_module_is_over_500_lines():
    """Modules hold one idea each; longer ones are split (a comment at the top says why where one is not)."""
    long = {path.relative_to(PACKAGE).as_posix(): len(path.read_text().splitlines()) for path in PACKAGE.rglob("*.py")}
    allowed = {name for name, lines in long.items()
               if lines > 500 and "longer than 500 lines because" in (PACKAGE / name).read_text()[:3000]}
    assert {name: lines for name, lines in long.items() if lines > 500 and name not in allowed} == {}
