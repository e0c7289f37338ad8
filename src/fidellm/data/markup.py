"""Markup left in a source's text, removed at read time when its registry entry says `markup: wikitext`.

Wikipedia text extracted without a wiki parser keeps `'''bold'''`, `[[links|label]]`, `{{templates}}`,
tables and, where the extraction cut pages apart badly, debris glued to the next page: category and file
names (`መደብ:…`, `ስዕል:…`), `#redirect` targets, interwiki prefixes (`de:…`), unclosed `[[`, `[http` and `{{`.
The 2015 Amharic Wikipedia source (MANIFEST A4) has 16,933 `'''` and 4,428 `መደብ:` in 1.15M characters.

`strip_wikitext` first cuts the debris a parser cannot see as markup: from each debris marker to the next
`'''` on its line (where the glued page's bold title starts) or to the line's end, and drops table and
infobox-parameter lines. Where a category or redirect name runs into a sentence with no title between
("መደብ:የእስያ አገራትኩዌት በአረቢያ … ነው።"), only the marker goes: the sentence is worth more than the glued
name costs. Then mwparserfromhell's `strip_code` turns the well-formed markup into its text
(a link into its label, a template into nothing, a heading into its words), and stray `''`, `]]` and
`}}` go.
"""

from __future__ import annotations

import re

MARKUPS = ("none", "wikitext")

_DEBRIS = re.compile(
    r"(?:መደብ|Category|ስዕል|ምስል|File|Image)\s*:|#redirect|\[\[|\{\{|\[https?://|(?-i:^[a-z][a-z-]{1,11}:(?=\S))",
    re.IGNORECASE,
)
_TABLE_LINE = re.compile(r"\s*(?:\{\||\|\}|\||!)")
_PARAMETER_LINE = re.compile(r"\s*[^\s=|]{1,40}\s*=(?!=)")
"""An infobox parameter: one word (often with `_`), then `=` (`ስም = ኮሞሮስ|`, `የመሪዎች_ስም = …`)."""
_TITLE = "'''"
_FILE = re.compile(r"(?:ስዕል|ምስል|File|Image)\s*:", re.IGNORECASE)
_FULL_STOP = "።"
_STRAY_CLOSER = re.compile(r"(?:\|(?:thumb(?:nail)?|left|right|center|upright|\d+px))*(?:\]\]|\}\})")
"""The end of a link, image or template whose start the extraction cut off, with its image options."""


_TEMPLATE_CLOSER = "}}"


def _cut_debris(line: str, last_template_closer: int) -> str:
    """`line` without its debris: each marker up to the next bold title on the line, or to its end.

    `last_template_closer` is where the text's last `}}` starts, counted from the start of `line` (it may
    lie past its end, or before its start): a `{{` before it is closed, on this line or a later one."""
    out: list[str] = []
    position = 0
    while match := _DEBRIS.search(line, position):
        marker = match.group(0)
        link_closer = "]]" if marker == "[[" else "]"  # a wiki link, or `[http://…` in any case
        if marker.startswith("[") and line.rfind(link_closer) >= match.end():
            out.append(line[position : match.end()])  # a whole link: the parser keeps its label
        elif marker == "{{" and last_template_closer >= match.end():
            out.append(line[position : match.end()])  # a whole template (maybe over lines): parser drops it
        else:
            out.append(line[position : match.start()])
            title = line.find(_TITLE, match.end())
            if title >= 0:
                position = title
                continue
            if _FILE.match(marker) or _FULL_STOP not in line[match.end() :]:
                return "".join(out)
            # a category name glued to a sentence with no title between: keep the sentence
        position = match.end()
    out.append(line[position:])
    return "".join(out)


def strip_wikitext(text: str) -> str:
    """The readable text of wikitext `text` (see the module docstring); lines stripped, empty lines gone."""
    import mwparserfromhell  # here, not at module level: the registry imports MARKUPS on every command

    last_template_closer = text.rfind(_TEMPLATE_CLOSER)
    kept, start = [], 0  # start: where each line starts in `text`
    for line in text.split("\n"):
        if not (_TABLE_LINE.match(line) or _PARAMETER_LINE.match(line)):
            kept.append(_cut_debris(line, last_template_closer - start))
        start += len(line) + 1
    plain = mwparserfromhell.parse("\n".join(kept)).strip_code(normalize=True, collapse=True)
    plain = _STRAY_CLOSER.sub("", plain.replace(_TITLE, "").replace("''", ""))
    return "\n".join(stripped for stripped in (line.strip() for line in plain.split("\n")) if stripped)


def strip_markup(text: str, markup: str) -> str:
    """`text` without the markup `markup` names (one of MARKUPS; "none" returns it unchanged)."""
    return strip_wikitext(text) if markup == "wikitext" else text
