"""Images that summarise a run for people: the contact sheet of an edit run."""

from __future__ import annotations

from recast.tasks import storage


def contact_sheet(reference_png: bytes, edits: list, tile: int = 256):
    """The reference and every successful edit side by side, each labelled with its prompt's theme, identity
    grade, score and seed."""
    from PIL import Image, ImageDraw

    tiles = [(storage.decode_image(reference_png), ["reference", ""])]
    for edit in edits:
        if edit.output:
            score = f" {edit.identity.score:.2f}" if edit.identity.score is not None else ""
            theme = edit.prompt.split(",")[0].strip()
            tiles.append((storage.load_image(edit.output), [theme[:34], f"{edit.identity.grade or '?'}{score} "
                                                                        f"s{edit.seed} #{edit.attempt}"]))
    sheet = Image.new("RGB", (tile * len(tiles), tile + 36), "white")
    draw = ImageDraw.Draw(sheet)
    for index, (image, lines) in enumerate(tiles):
        image.thumbnail((tile, tile))
        sheet.paste(image, (index * tile + (tile - image.width) // 2, (tile - image.height) // 2))
        for row, line in enumerate(lines):
            draw.text((index * tile + 6, tile + 4 + 15 * row), line, fill="black")
    return sheet
