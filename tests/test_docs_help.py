"""The documentation is complete: every vitx option has help text and a line in docs/cli.md, every
model forward documents each argument of its signature (the same text in the three frameworks),
every docs/ path cited exists, NUMERICS.md lists every tolerance of vit_core.tolerances, and no
project file points outside the repository."""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import inspect
import pathlib
import pydoc
import re

import pytest

from conversion.cli import COMMANDS, _parser
from vit_core.tolerances import TOLERANCES

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PACKAGES = ("vit_core", "vit_torch", "vit_tf", "vit_flax", "conversion")
MODEL_CLASSES = {
    "vit_torch": {"base": "ViTModel", "mim": "ViTForMaskedImageModeling", "classification": "ViTForImageClassification"},
    "vit_tf": {"base": "TFViTModel", "mim": "TFViTForMaskedImageModeling", "classification": "TFViTForImageClassification"},
    "vit_flax": {"base": "FlaxViTModel", "mim": "FlaxViTForMaskedImageModeling",
                 "classification": "FlaxViTForImageClassification"},
}
FORWARDS = {"vit_torch": ("forward",), "vit_tf": ("call",), "vit_flax": ("__call__", "forward")}
_FRAMEWORK = {"vit_torch": "torch", "vit_tf": "tensorflow", "vit_flax": "flax"}


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("vitx has no subcommands")


# ------------------------------------------------------------------------------------ CLI help
def test_every_option_of_every_command_has_help() -> None:
    parser = _parser()
    commands = subparsers(parser)
    assert set(commands) == set(COMMANDS)
    missing = []
    for name, sub in [("vitx", parser), *commands.items()]:
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            if action.help == argparse.SUPPRESS:
                # only the per-command copy of the global --quiet is hidden (vitx --help shows it)
                assert action.dest == "quiet" and name != "vitx", (name, action.dest)
                continue
            if not (action.help and action.help.strip()):
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, f"options without help: {missing}"


def test_every_command_has_a_summary_and_a_description() -> None:
    parser = _parser()
    summaries = {a.dest: a.help for a in next(x for x in parser._actions
                                              if isinstance(x, argparse._SubParsersAction))._choices_actions}
    for name, sub in subparsers(parser).items():
        assert summaries.get(name, "").strip(), name
        assert sub.description and len(sub.description) > len(summaries[name]), name
        assert sub.format_help().count("\n") > 5


def test_docs_cli_md_covers_every_command_and_option() -> None:
    text = (DOCS / "cli.md").read_text(encoding="utf-8")
    for name, sub in subparsers(_parser()).items():
        section = re.search(rf"^## `vitx {name}`\n(.*?)(?=^## |\Z)", text, re.M | re.S)
        assert section, f"docs/cli.md has no '## `vitx {name}`' section"
        body = section.group(1)
        examples = re.findall(r"```bash\n(.*?)```", body, re.S)
        assert any(f"vitx {name}" in example for example in examples), f"docs/cli.md, vitx {name}: no example"
        for action in sub._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
                continue
            label = action.option_strings[0] if action.option_strings else (action.metavar or action.dest).upper()
            assert f"`{label}" in body, f"docs/cli.md, vitx {name}: {label} is not described"


# ------------------------------------------------------------------------------------ docstrings
def args_section(doc: str) -> dict[str, str]:
    """``name: text`` entries of a Google-style Args section, continuation lines joined."""
    match = re.search(r"^\s*Args:\n(.*?)(?:^\s*\n|\Z)", doc, re.M | re.S)
    assert match, "no Args section"
    entries: dict[str, str] = {}
    current = None
    for line in match.group(1).splitlines():
        head = re.match(r"^ {12}(\w+): (.*)$", line)
        if head:
            current = head.group(1)
            entries[current] = head.group(2).strip()
        elif current and line.startswith(" " * 16):
            entries[current] += " " + line.strip()
    return entries


def model_forwards() -> list[tuple[str, str, str, str]]:
    """(package, task, class name, method) of every model forward, read from the source (no framework imported)."""
    found = []
    for package, classes in MODEL_CLASSES.items():
        tree = ast.parse((ROOT / package / "modeling.py").read_text(encoding="utf-8"))
        defined = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
        for task, name in classes.items():
            methods = {f.name for f in defined[name].body if isinstance(f, ast.FunctionDef)}
            for method in FORWARDS[package]:
                assert method in methods, f"{package}.{name}.{method}"
                found.append((package, task, name, method))
    return found


@pytest.mark.parametrize("package, task, name, method", model_forwards())
def test_forward_docstring_documents_every_argument(package: str, task: str, name: str, method: str) -> None:
    if importlib.util.find_spec(_FRAMEWORK[package]) is None:
        pytest.skip(f"{_FRAMEWORK[package]} not installed")
    function = getattr(getattr(importlib.import_module(package), name), method)
    doc = inspect.getdoc(function) or ""
    parameters = [p for p in inspect.signature(function).parameters if p != "self"]
    entries = args_section(function.__doc__ or "")
    assert list(entries) == parameters, f"{name}.{method}: Args {list(entries)} != signature {parameters}"
    assert all(len(text) > 20 for text in entries.values())
    assert re.search(r"^Returns:\n\s+\S", doc, re.M), f"{name}.{method}: no Returns section"
    rendered = pydoc.render_doc(function, renderer=pydoc.plaintext)  # what help() shows
    for parameter in parameters:
        assert f"{parameter}:" in rendered


def test_forward_docstrings_are_the_same_text_in_the_three_frameworks() -> None:
    """Read from the source, so the test runs whatever is installed."""
    texts: dict[tuple[str, str], dict[str, str]] = {}
    returns: dict[str, set[str]] = {}
    for package, task, name, method in model_forwards():
        tree = ast.parse((ROOT / package / "modeling.py").read_text(encoding="utf-8"))
        cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)
        fn = next(f for f in cls.body if isinstance(f, ast.FunctionDef) and f.name == method)
        doc = ast.get_docstring(fn, clean=False) or ""
        for argument, text in args_section(doc).items():
            texts.setdefault((task, argument), {})[f"{package}.{name}.{method}"] = text
        returns.setdefault(task, set()).add(" ".join(doc.split("Returns:")[1].split()))
    for (task, argument), by_function in texts.items():
        assert len(set(by_function.values())) == 1, f"{task} {argument}: the texts differ: {by_function}"
    assert all(len(r) == 1 for r in returns.values()), returns
    shared = [key for key, by_function in texts.items() if len(by_function) >= 3]
    assert len(shared) >= 20  # pixel_values ... return_dict for all three tasks, in all three frameworks


# ------------------------------------------------------------------------------------ docs
def project_files() -> list[pathlib.Path]:
    files = [ROOT / "README.md", ROOT / "pyproject.toml", ROOT / "Makefile", *DOCS.glob("*.md")]
    for package in PACKAGES + ("tests", "benchmarks", "scripts"):
        files += [p for p in (ROOT / package).rglob("*.py")]
    # the project's own files: not a virtual environment or cache inside it (benchmarks/.venv-peers)
    return [p for p in files if p.is_file() and not any(part.startswith(".") for part in p.relative_to(ROOT).parts)]


def test_every_cited_doc_exists() -> None:
    cited: dict[str, list[str]] = {}
    for path in project_files():
        for doc in re.findall(r"docs/[\w.-]+\.md", path.read_text(encoding="utf-8", errors="replace")):
            cited.setdefault(doc, []).append(str(path.relative_to(ROOT)))
    parser = _parser()
    for name, sub in subparsers(parser).items():
        for doc in re.findall(r"docs/[\w.-]+\.md", sub.format_help().replace("\n", " ").replace("  ", " ")):
            cited.setdefault(doc, []).append(f"vitx {name} --help")
    missing = {doc: where for doc, where in cited.items() if not (ROOT / doc).is_file()}
    assert not missing, f"cited but missing: {missing}"
    for required in ("docs/NUMERICS.md", "docs/FORMATS.md", "docs/cli.md", "docs/attention.md"):
        assert required in cited, f"nothing cites {required}"


def test_readme_links_resolve() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), target


def test_nothing_points_outside_the_repository() -> None:
    pattern = re.compile(r"\.\./shared|(?<![\w.-])shared/|/work/")
    offenders = [str(p.relative_to(ROOT)) for p in project_files()
                 if p.name != "test_docs_help.py" and pattern.search(p.read_text(encoding="utf-8", errors="replace"))]
    assert not offenders, offenders


def test_numerics_md_lists_every_tolerance() -> None:
    text = (DOCS / "NUMERICS.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\|(.*)\| *([0-9.e-]+) *\| *`(\w+)` *\|$", text, re.M)
    documented: dict[str, set[float]] = {}
    for _, bound, key in rows:
        documented.setdefault(key, set()).add(float(bound))
    assert set(documented) == set(TOLERANCES), set(documented) ^ set(TOLERANCES)
    for key, bounds in documented.items():
        assert bounds == {TOLERANCES[key]}, (key, bounds, TOLERANCES[key])


def test_formats_md_has_a_section_per_format() -> None:
    from conversion.convert import TARGETS
    from conversion.formats import FORMATS

    headings = re.findall(r"^## \d+\. (.*)$", (DOCS / "FORMATS.md").read_text(encoding="utf-8"), re.M)
    words = {"transformers": "transformers 4.x", "timm": "timm", "jax": "Original Google JAX", "big_vision": "big_vision"}
    for fmt in FORMATS:
        assert any(words[fmt.name] in h for h in headings), fmt.name
    for target, heading in (("tf", "TensorFlow"), ("flax", "Flax"), ("safetensors", "Canonical")):
        assert target in TARGETS and any(heading in h for h in headings)
    assert any("vitx attention" in h for h in headings)


def test_readme_quick_start_runs_on_a_checkpoint(tmp_path: pathlib.Path) -> None:
    """The PyTorch quick start, as written, on a local checkpoint whose processor is not the default
    one (48 x 48, ImageNet mean / std): from_pretrained must pick that up."""
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch not installed")
    import contextlib
    import io

    import numpy as np
    import torch

    from vit_core import ViTConfig, ViTImageProcessor
    from vit_torch import ViTForImageClassification

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    quick = text.split("## Quick start", 1)[1]
    code = re.search(r"```python\n(.*?)```", quick, re.S).group(1)
    assert "ViTImageProcessor.from_pretrained(checkpoint)" in code and "ViTImageProcessor()" not in code
    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                       image_size=48, patch_size=8, num_labels=3, id2label={0: "cat", 1: "dog", 2: "cup"})
    ViTForImageClassification(config).save_pretrained(tmp_path / "ckpt")
    saved = ViTImageProcessor(size={"height": 48, "width": 48}, image_mean=[0.485, 0.456, 0.406],
                              image_std=[0.229, 0.224, 0.225])
    saved.save_pretrained(tmp_path / "ckpt")
    photo = ROOT / "tests" / "fixtures" / "images" / "chelsea.png"
    code = code.replace('"path/or/hub-id"', repr(str(tmp_path / "ckpt"))).replace('"cat.png"', repr(str(photo)))
    printed = io.StringIO()
    scope: dict[str, object] = {}
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), scope)
    assert printed.getvalue().strip() in {"cat", "dog", "cup"}
    from PIL import Image

    expected = saved(Image.open(photo), return_tensors="np")["pixel_values"]
    assert scope["inputs"]["pixel_values"].shape == (1, 3, 48, 48)
    np.testing.assert_array_equal(scope["inputs"]["pixel_values"].numpy(), expected)
