"""The README's code snippet runs as written (a user copies it first)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks(section: str) -> list[str]:
    text = README.read_text()
    body = text[text.index(section) :]
    body = body[: body.index("\n## ", 1)]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


def test_use_it_in_your_code_snippet_runs(capsys):
    blocks = _python_blocks("## Use it in your code")
    assert len(blocks) == 1, "expected one python snippet in 'Use it in your code'"
    namespace: dict = {"__name__": "readme_snippet"}
    exec(compile(blocks[0], str(README), "exec"), namespace)  # noqa: S102 - the snippet is ours
    out = capsys.readouterr().out
    assert "| clean |" in out and "| autoattack |" in out
    model, x_adv, x = namespace["model"], namespace["x_adv"], namespace["x"]
    assert not model.training  # the snippet attacks the eval-mode network
    assert float((x_adv - x).abs().max()) <= 4 / 255 + 1e-6
