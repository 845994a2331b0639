"""Prompt sets: the bundled files load, render the identity once per prompt, and bad files name file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from idforge.errors import ConfigError
from idforge.io.prompts import PromptSet, load_prompt_set

CATEGORIES = ["clothing", "accessory", "action", "expression", "view", "background", "style", "complex"]


@pytest.fixture(scope="module")
def prompts_dir(repo_root: Path) -> Path:
    return repo_root / "data" / "prompts"


def test_eval_set_has_the_paper_categories(prompts_dir: Path) -> None:
    ps = load_prompt_set(prompts_dir / "eval.yaml")
    assert ps.name == "eval"
    assert list(ps.categories) == CATEGORIES
    assert all(5 <= len(v) <= 8 for v in ps.categories.values())
    assert len(ps) == 50
    assert set(ps.cite) == set(CATEGORIES)
    assert "Infinite-ID" in ps.cite["style"] and "PIDiff" in ps.cite["complex"]


def test_every_bundled_set_loads(prompts_dir: Path) -> None:
    names = {p.name: load_prompt_set(p) for p in sorted(prompts_dir.glob("*.yaml"))}
    assert {"eval.yaml", "smoke.yaml"} <= set(names)
    assert len(names["smoke.yaml"]) == 3


def test_render_puts_the_identity_in_each_prompt_once(prompts_dir: Path) -> None:
    ps = load_prompt_set(prompts_dir / "smoke.yaml")
    assert ps.render("sks man") == {
        "plain": ["a photo of sks man"],
        "clothing": ["a photo of sks man wearing a red hat"],
        "background": ["a photo of sks man in the snow"],
    }
    items = ps.items("<id0> person")
    assert [(r.category, r.index) for r in items] == [("plain", 0), ("clothing", 0), ("background", 0)]
    assert all(r.text.count("<id0> person") == 1 and "{}" not in r.text for r in items)
    assert items[1].template == "a photo of {} wearing a red hat"


def test_render_rejects_an_empty_token(prompts_dir: Path) -> None:
    ps = load_prompt_set(prompts_dir / "smoke.yaml")
    with pytest.raises(ConfigError, match="identity token '  ' is empty"):
        ps.render("  ")
    with pytest.raises(ConfigError, match="contains"):
        ps.items("a {} b")


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ("name: x\nsource: s\ncategories:\n  c:\n    - a photo of {}\n    - a photo\n",
         r"bad\.yaml: categories\.c\[1\] 'a photo' has 0 '\{\}' placeholders"),
        ("name: x\nsource: s\ncategories:\n  c: ['{} and {}']\n", r"categories\.c\[0\] .* has 2 '\{\}'"),
        ("name: x\nsource: s\ncategories:\n  c: ['a photo of {name}']\n", r"has 0 '\{\}' placeholders"),
        ("name: x\nsource: s\ncategories:\n  c: ['{} with {x}']\n", r"has a brace besides"),
        ("name: x\nsource: s\ncategories:\n  c: []\n", r"categories\.c: has no prompts"),
        ("name: x\nsource: s\ncategories:\n  c: ['{} a', 7]\n", r"categories\.c\.1: Input should be a valid string"),
        ("name: x\nsource: s\ncategories: {c: ['{} a']}\ncolour: red\n", r"colour: unknown key; allowed: name"),
        ("name: x\ncategories: {c: ['{} a']}\n", r"source: Field required"),
        ("name: x\nsource: s\ncategories: {c: ['{} a']}\ncite: {d: paper}\n",
         r"cite\.d: names a category that does not exist; categories: c"),
        ("name: x\nsource: s\ncategories: {c: ['{} a', '{} a']}\n", r"categories\.c: lists a prompt twice"),
        ("- just\n- a list\n", r"must hold a mapping"),
        ("name: [unclosed\n", r"is not valid YAML"),
    ],
)
def test_bad_sets_name_the_file_and_key(tmp_path: Path, body: str, match: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=match) as info:
        load_prompt_set(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml does not exist"):
        load_prompt_set(tmp_path / "nope.yaml")


def test_model_round_trip() -> None:
    ps = PromptSet(name="n", source="s", categories={"a": ["{} x", "y {}"]})
    assert PromptSet.model_validate(ps.model_dump()) == ps
    assert len(ps) == 2
