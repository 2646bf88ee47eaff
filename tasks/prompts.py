"""Prompt templates (configs/prompts.yaml) and a prompt check built from what the origin saw fail.

Each check returns a warning that says why: the origin graded results by hand and found that dark scenes,
vague prompts, bare franchise names and face-changing wording lose the person's identity.
"""

from __future__ import annotations

import re
import string
from functools import lru_cache

import yaml

from recast.tasks.errors import BadInput
from recast.tasks.settings import config_dir

CLOTHING = r"wearing|dressed|suit|tuxedo|coat|jacket|shirt|dress|uniform|costume|hat|cap|fedora|armor|armour|" \
           r"robe|gown|hoodie|sweater|blazer|jeans|trousers|shorts|boots|outfit|vest|cloak|scarf|glasses|sunglasses"
ENVIRONMENT = r"background|backdrop|setting|in an? |at an? |on an? |street|room|studio|office|stage|city|forest|" \
              r"beach|desert|highway|casino|temple|house|bar|desk|sky|park|street|interior|exterior|landscape|" \
              r"airfield|airport|runway|pub|tavern|restaurant|cafe|library|kitchen|garden|mountain|ocean|harbou?r|" \
              r"ship|train|station|castle|palace|church|lab|laboratory|hospital|classroom|stadium|arena|alley|" \
              r"warehouse|factory|cockpit|spaceship|jungle|village|market"
LIGHTING = r"light|lighting|lit\b|sunlight|sunset|sunrise|golden hour|neon|glow|daylight|backlit|shadows|" \
           r"spotlight|studio lights|candle"
# "dark" about the scene, not about a colour: a dark blazer, dark hair or dark sunglasses are not a dark scene.
DARK = r"\bdark\b(?!\s+(?:(?:long|short|navy|grey|gray|blue|brown|green|red|leather|wool|tailored)\s+)*" \
       r"(?:blazer|suit|coat|jacket|shirt|dress|tuxedo|hat|cap|fedora|sweater|hoodie|trousers|jeans|boots|hair|eyes|" \
       r"sunglasses|glasses|tie|uniform|robe|gown|cloak|scarf|vest|outfit)s?\b)|darkness|pitch[- ]black|\bnight\b|" \
       r"midnight|\bdim\b|dimly|shadowy|murky|gloomy|noir|moonlit|candlelit|unlit|blackout"
BRIGHT = r"bright|well[- ]lit|brightly|balanced lighting|soft light|studio lighting|spotlight"
FACE_CHANGE = r"\bolder\b|\belderly\b|\baged\b|\byounger\b|\bas a child\b|\bbaby\b|\bfat\b|\bobese\b|\bchubby\b|" \
              r"\bskinny\b|\bgaunt\b|face swap|different face|change (?:his|her|their|the) face|plastic surgery|" \
              r"caricature|\bzombie\b|\bskull\b|\bmask\b|\bmasked\b|\bhelmet\b|\banime\b|\bcartoon\b|\bchibi\b|" \
              r"\bmuppet\b|\bclay\b|\balien\b|\borc\b|\belf\b"
FRANCHISES = ["star wars", "stranger things", "harry potter", "game of thrones", "marvel", "the matrix",
              "james bond", "star trek", "lord of the rings", "peaky blinders", "mad max", "top gun", "john wick",
              "indiana jones", "the godfather", "batman", "superman", "spider-man", "jedi", "sith"]
GLASSES = r"glasses|spectacles|eyeglasses|sunglasses|goggles"


@lru_cache(maxsize=1)
def templates() -> dict[str, dict]:
    with open(config_dir() / "prompts.yaml", encoding="utf-8") as f:
        return yaml.safe_load(f)


def template_fields(name: str) -> list[str]:
    return [field for _, field, _, _ in string.Formatter().parse(templates()[name]["template"]) if field]


def fill(name: str, values: dict[str, str]) -> str:
    """The template `name` with `values` (and its defaults) filled in; every field must end up set."""
    known = templates()
    if name not in known:
        raise BadInput("--template", name, "unknown template", f"use one of: {', '.join(sorted(known))}")
    spec = known[name]
    fields = template_fields(name)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise BadInput("--set", unknown[0], f"template '{name}' has no field '{unknown[0]}'",
                       f"its fields are: {', '.join(fields)}")
    merged = {**(spec.get("defaults") or {}), **{k: v for k, v in values.items() if v.strip()}}
    missing = [f for f in fields if not str(merged.get(f, "")).strip()]
    if missing:
        examples = " ".join(f'--set {field}="{(spec.get("example") or {}).get(field, "...")}"' for field in missing)
        needs = ", ".join(f"'{field}'" for field in missing)
        raise BadInput("--set", missing[0] if len(missing) == 1 else missing,
                       f"template '{name}' needs a value for {needs}", f"add {examples}")
    return spec["template"].format(**merged)


def parse_assignments(pairs: list[str]) -> dict[str, str]:
    values = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise BadInput("--set", pair, "expected FIELD=VALUE", 'e.g. --set character="James Bond 007"')
        values[key.strip()] = value.strip()
    return values


def _has(pattern: str, text: str) -> bool:
    return re.search(pattern, text, flags=re.IGNORECASE) is not None


def check(prompt: str, identity_notes: str = "", reference_has_glasses: bool | None = None) -> list[str]:
    """Warnings (with the reason) for what the origin found to lose identity or quality."""
    warnings = []
    if _has(DARK, prompt) and not _has(BRIGHT, prompt):
        warnings.append("too dark: dark scenes lost the identity entirely (the origin's 'Jedi, dark temple' edit "
                        "graded Lost); add balanced or bright lighting")
    missing = [name for name, pattern in (("clothing", CLOTHING), ("environment", ENVIRONMENT),
                                          ("lighting", LIGHTING)) if not _has(pattern, prompt)]
    if missing:
        warnings.append(f"vague: no {', no '.join(missing)} detail; the origin's prompts that worked named the "
                        "costume, the place and the light")
    franchise = next((f for f in FRANCHISES if f in prompt.lower()), None)
    if franchise and (len(prompt.split()) < 8 or not _has(CLOTHING, prompt)):
        warnings.append(f"franchise name '{franchise}' without visual details: a name alone ('Stranger Things') "
                        "was not enough; describe the costume and setting")
    if _has(FACE_CHANGE, prompt):
        match = re.search(FACE_CHANGE, prompt, flags=re.IGNORECASE).group(0)
        warnings.append(f"'{match}' changes or hides the face shape; such edits drifted from the identity")
    wears_glasses = reference_has_glasses if reference_has_glasses is not None else _has(GLASSES, identity_notes) \
        and not re.search(r"\bno (?:glasses|spectacles)\b", identity_notes, flags=re.IGNORECASE)
    if wears_glasses and not _has(GLASSES, prompt):
        warnings.append("the person wears glasses but the prompt does not mention them: say 'wearing his glasses' "
                        "to keep them")
    return warnings
