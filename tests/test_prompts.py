"""Prompt templates and the prompt check (each rule from what the origin saw fail)."""

from __future__ import annotations

import pytest

from recast.flows.cli import main
from recast.tasks import prompts
from recast.tasks.errors import BadInput

GOOD = ("James Bond 007, wearing a tuxedo with bow tie, holding a martini glass, casino background, "
        "cinematic lighting, spy thriller aesthetic")


def test_character_template_fills_named_fields_and_defaults():
    text = prompts.fill("character", {"character": "James Bond 007", "costume": "a tuxedo with bow tie",
                                      "background": "casino background"})
    assert text.startswith("James Bond 007, wearing a tuxedo with bow tie, ")
    assert "casino background" in text and "cinematic lighting" in text, "defaults must fill unset fields"


def test_missing_or_unknown_template_fields_are_clear_errors():
    with pytest.raises(BadInput, match="needs a value for 'costume'"):
        prompts.fill("character", {"character": "Neo"})
    with pytest.raises(BadInput, match="has no field 'hat'"):
        prompts.fill("character", {"character": "Neo", "hat": "fedora"})
    with pytest.raises(BadInput, match="unknown template"):
        prompts.fill("nope", {})


def test_every_shipped_template_fills_from_its_example():
    for name, spec in prompts.templates().items():
        assert prompts.fill(name, spec["example"]), name


def test_a_specific_prompt_passes_the_check():
    assert prompts.check(GOOD) == [], prompts.check(GOOD)


@pytest.mark.parametrize("prompt,rule", [
    ("a man wearing a cloak in a dark temple at night, candle light", "too dark"),
    ("a portrait of a man", "vague"),
    ("Stranger Things", "franchise name 'stranger things'"),
    ("make him older, wearing a suit in an office, soft light", "'older'"),
    ("a man wearing a zombie mask in a street, neon lighting", "face shape"),
])
def test_each_rule_warns_with_its_reason(prompt, rule):
    warnings = prompts.check(prompt)
    assert any(rule in w for w in warnings), f"{prompt!r}: expected a {rule!r} warning, got {warnings}"


def test_a_dark_garment_is_not_a_dark_scene():
    assert prompts.check("Tech CEO on stage, wearing a dark blazer, conference backdrop, blue lighting") == []
    assert any("too dark" in w for w in prompts.check("a man wearing a suit in a dark alley, street lamp light"))


def test_glasses_from_identity_notes_must_be_mentioned():
    assert any("glasses" in w for w in prompts.check(GOOD, identity_notes="wears round glasses"))
    assert not any("glasses" in w for w in prompts.check(GOOD + ", wearing his glasses", "wears glasses"))
    assert not any("glasses" in w for w in prompts.check(GOOD, "no glasses"))


def test_cli_template_strict_and_warnings(astronaut, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RECAST_HANDOFF__MODE", "none")
    root = tmp_path / "s"
    code = main(["edit", str(astronaut), "--template", "character", "--set", "character=Neo", "--storage", str(root)])
    assert code == 2 and "costume" in capsys.readouterr().err and not root.exists()
    code = main(["edit", str(astronaut), "--prompt", "Stranger Things", "--strict", "--storage", str(root)])
    err = capsys.readouterr().err
    assert code == 2 and "prompt check" in err and not root.exists(), err
