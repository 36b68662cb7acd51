"""The per-preset hyperparameter tables in the recipe READMEs agree with the presets they describe.

Each table is headed ``#### Preset `<name>``` and has the columns ``| key | paper | source | recipe | note |``.
Checked for every recipe and every preset, whatever its name: (a) every preset in the recipe's ``PRESETS`` has
a table (and every table names a preset), (b) each row's ``recipe`` literal equals the resolved preset's value at
the row's dotted ``key``, (c) a row whose ``paper`` cell is not that same literal has a non-empty ``note``.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import math
import operator
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ("advxl", "fast_advprop")
HEADER = "| key | paper | source | recipe | note |"
_TITLE = re.compile(r"^#### Preset `([A-Za-z_][A-Za-z0-9_]*)`\s*$")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def literal(text: str):
    """A cell's Python literal (``ast.literal_eval``), also allowing arithmetic on numbers (``4 / 255``)."""

    def ev(node):
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            a, b = ev(node.left), ev(node.right)
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b)):
                raise ValueError(f"arithmetic on non-numbers in {text!r}")
            return _OPS[type(node.op)](a, b)
        if isinstance(node, ast.Tuple):
            return tuple(ev(e) for e in node.elts)
        if isinstance(node, ast.List):
            return [ev(e) for e in node.elts]
        if isinstance(node, ast.Dict):
            return {ev(k): ev(v) for k, v in zip(node.keys, node.values, strict=True)}
        return ast.literal_eval(node)

    return ev(ast.parse(text.strip(), mode="eval").body)


def same(a, b) -> bool:
    """Equal values; floats to 1e-12 relative, tuples and lists alike (JSON overrides give lists)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0) or a == b
    return a == b


def resolve(cfg, key: str):
    """The value at a dotted key: dataclass fields, tuple / list indices, dict keys."""
    value = cfg
    for part in key.split("."):
        if dataclasses.is_dataclass(value) and part in {f.name for f in dataclasses.fields(value)}:
            value = getattr(value, part)
        elif isinstance(value, (list, tuple)) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        elif isinstance(value, dict) and part in value:
            value = value[part]
        else:
            raise KeyError(f"{key!r}: no {part!r} in {type(value).__name__}")
    return value


def parse_tables(text: str) -> dict[str, list[dict]]:
    """``{preset: [row, ...]}``; each row a dict of the five columns, backticks stripped from key and recipe."""
    tables: dict[str, list[dict]] = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = _TITLE.match(line)
        if not m:
            continue
        name = m.group(1)
        if name in tables:
            raise ValueError(f"two tables for preset {name!r}")
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        if j + 1 >= len(lines) or lines[j].strip() != HEADER or lines[j + 1].strip() != "|---|---|---|---|---|":
            raise ValueError(f"preset {name!r}: the table must start with {HEADER!r} and |---|---|---|---|---|")
        rows = []
        for row in lines[j + 2 :]:
            if not row.startswith("|"):
                break
            cells = [c.strip() for c in row.strip().strip("|").split("|")]
            if len(cells) != 5:
                raise ValueError(f"preset {name!r}: a row needs 5 cells: {row!r}")
            key, paper, source, recipe, note = cells
            if not (key.startswith("`") and key.endswith("`") and recipe.startswith("`") and recipe.endswith("`")):
                raise ValueError(f"preset {name!r}: key and recipe must be in backticks: {row!r}")
            rows.append(dict(key=key[1:-1], paper=paper, source=source, recipe=recipe[1:-1], note=note))
        tables[name] = rows
    return tables


def _paper_matches(paper: str, recipe_value) -> bool:
    try:
        return same(literal(paper.strip("`")), recipe_value)
    except (ValueError, SyntaxError, TypeError):
        return False


@pytest.fixture(scope="module", params=RECIPES)
def recipe(request):
    config = importlib.import_module(f"recipes.{request.param}.config")
    text = (ROOT / "recipes" / request.param / "README.md").read_text()
    return request.param, config, parse_tables(text)


def test_every_preset_has_a_table_and_every_table_a_preset(recipe):
    name, config, tables = recipe
    assert sorted(set(config.PRESETS) - set(tables)) == [], f"{name}: presets without a table"
    assert sorted(set(tables) - set(config.PRESETS)) == [], f"{name}: tables naming no preset"
    assert all(tables[p] for p in tables), f"{name}: empty tables"


def test_recipe_column_is_the_resolved_preset_value_and_deviations_have_notes(recipe):
    name, config, tables = recipe
    problems = []
    for preset_name, rows in tables.items():
        if preset_name not in config.PRESETS:
            continue
        cfg = config.preset(preset_name)
        keys = [r["key"] for r in rows]
        problems += [f"{preset_name}: key {k!r} twice" for k in {k for k in keys if keys.count(k) > 1}]
        for r in rows:
            where = f"{name}/{preset_name} `{r['key']}`"
            try:
                actual = resolve(cfg, r["key"])
            except KeyError as err:
                problems.append(f"{where}: {err}")
                continue
            want = literal(r["recipe"])
            if not same(want, actual):
                problems.append(f"{where}: README says {r['recipe']}, the preset has {actual!r}")
            if not _paper_matches(r["paper"], actual) and not r["note"]:
                problems.append(f"{where}: recipe differs from paper {r['paper']!r} and the note is empty")
            if not r["paper"] or not r["source"]:
                problems.append(f"{where}: empty paper or source cell (write `not stated`)")
    assert problems == []


def test_the_parser_and_checks_catch_what_they_should():
    text = "\n".join(
        [
            "#### Preset `demo`",
            "",
            HEADER,
            "|---|---|---|---|---|",
            "| `optim.lr` | 1e-4 x batch/256 | MAE | `0.0016` | 1e-4 x 4096 / 256 |",
            "| `stages.0.attack.eps` | 4/255 | paper | `4 / 255` | |",
            "",
            "#### Preset `other`",
            HEADER,
        ]
    )
    with pytest.raises(ValueError, match="'other': the table must start"):
        parse_tables(text)
    rows = parse_tables(text.rsplit("\n#### Preset `other`", 1)[0])["demo"]
    assert [r["key"] for r in rows] == ["optim.lr", "stages.0.attack.eps"] and rows[1]["note"] == ""
    assert same(literal(rows[1]["recipe"]), 4 / 255) and _paper_matches("`4 / 255`", 4 / 255)
    assert not _paper_matches("1e-4 x batch/256", 0.0016) and not same(literal("(0.08, 1.0)"), (0.35, 1.0))
    assert same(literal("[0.08, 1.0]"), (0.08, 1.0)) and not same(literal("1"), True)

    @dataclasses.dataclass
    class C:
        xs: tuple = (1, {"a": 2})

    assert resolve(C(), "xs.1.a") == 2
    with pytest.raises(KeyError, match="no 'b'"):
        resolve(C(), "xs.1.b")
