"""Words for synthetic scenes: noun phrases, relations, regions, and several caption templates per scene.

Captions are exact: counts, colours and shapes always; spatial phrases only where GenEval's rule gives the
relation (`scene.relative_position`); regions (thirds of the image) only in the detailed description.
"""

from __future__ import annotations

import re
from types import MappingProxyType

from mllm.synthetic.scene import Scene, SceneObject, relative_position

NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six")
BACKGROUND_WORDS = MappingProxyType(
    {"noise": "mottled", "stripes": "striped", "checker": "checkered", "gradient": "gradient", "dots": "dotted"}
)
RELATION_PHRASES = MappingProxyType(
    {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
)


def article(word: str) -> str:
    """'a' or 'an' for the word that follows."""
    return "an" if word[0] in "aeiou" else "a"


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith(("s", "x", "sh", "ch")) else "s")


def noun_phrase(count: int, shape: str, color: str | None = None) -> str:
    """'a red circle', 'an orange star', 'two blue crosses', 'three squares'."""
    words = f"{color} {shape}" if color else shape
    if count == 1:
        return f"{article(words)} {words}"
    return f"{NUMBER_WORDS[count]} {color + ' ' if color else ''}{plural(shape)}"


def join(items: list[str]) -> str:
    """'x', 'x and y', 'x, y and z'."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def groups(scene: Scene) -> list[tuple[int, str, str]]:
    """(count, shape, color) per distinct coloured shape, ordered by the leftmost object of each group."""
    order = sorted(scene.objects, key=lambda o: o.center[0])
    cats = list(dict.fromkeys((o.shape, o.color) for o in order))
    return [(sum((o.shape, o.color) == c for o in order), *c) for c in cats]


def object_list(scene: Scene) -> str:
    """'a red circle and two blue stars'."""
    return join([noun_phrase(n, shape, color) for n, shape, color in groups(scene)])


def background_phrase(scene: Scene) -> str:
    """'a light striped background' (light/dark from the mean grey level of the two tones)."""
    tone = "light" if sum(map(sum, scene.background.tones)) / 6 >= 145 else "dark"
    return f"{article(tone)} {tone} {BACKGROUND_WORDS[scene.background.kind]} background"


def region(obj: SceneObject) -> str:
    """Where an object is, by thirds of the image: 'at the top left', 'in the center', 'on the right'."""
    x, y = obj.center
    col = "left" if x < 1 / 3 else "right" if x > 2 / 3 else ""
    row = "top" if y < 1 / 3 else "bottom" if y > 2 / 3 else ""
    if row and col:
        return f"at the {row} {col}"
    if row or col:
        return f"{'at' if row else 'on'} the {row or col}"
    return "in the center"


def relation_phrase(rels: frozenset[str]) -> str:
    """'to the left of', 'above and to the right of' (all relations that hold, from `relative_position`)."""
    return join([RELATION_PHRASES[r] for r in sorted(rels)])


def relation_sentence(a: SceneObject, b: SceneObject) -> str | None:
    """'a red circle to the left of a blue star' when GenEval's rule gives a relation of a to b, else None."""
    rels = relative_position(a.bbox, b.bbox)
    if not rels:
        return None
    return f"{noun_phrase(1, a.shape, a.color)} {relation_phrase(rels)} {noun_phrase(1, b.shape, b.color)}"


def ordered_sentence(scene: Scene, rel: str, words: str) -> str | None:
    """'from left to right: a red circle, a blue star and a green cross' when every consecutive pair (sorted along
    the axis of `rel`) stands in relation `rel`, else None."""
    axis = 0 if rel in ("left of", "right of") else 1
    order = sorted(scene.objects, key=lambda o: o.center[axis])
    if len(order) < 2 or any(
        rel not in relative_position(a.bbox, b.bbox) for a, b in zip(order[:-1], order[1:], strict=True)
    ):
        return None
    return f"{words}: " + join([noun_phrase(1, o.shape, o.color) for o in order])


DESCRIPTION_START = "There "  # how every `describe` caption starts, and no other caption style


def is_description(caption: str) -> bool:
    """True for a `describe` caption (count, background, every object with its region) among a scene's captions."""
    return caption.startswith(DESCRIPTION_START)


def describe(scene: Scene) -> str:
    """A detailed description: count, background, and every object with its region (`is_description` tells it
    apart from the other caption styles)."""
    n = len(scene.objects)
    things = join(
        [f"{noun_phrase(1, o.shape, o.color)} {region(o)}" for o in sorted(scene.objects, key=lambda o: o.center)]
    )
    head = f"There {'is' if n == 1 else 'are'} {noun_phrase(n, 'object')} on {background_phrase(scene)}"
    return f"{head}: {things}."


MIRRORED_SIDES = MappingProxyType({"left": "right", "right": "left", "top": "bottom", "bottom": "top"})


def mirror_regions(description: str) -> str:
    """A `describe` caption with every region word mirrored (left <-> right, top <-> bottom), the rest and the order of
    the objects kept: the same objects, each placed where the scene does not have it (centred ones stay)."""
    head, sep, things = description.partition(": ")
    if not is_description(description) or not sep:
        raise ValueError(f"not a region description: {description[:60]!r}")
    return head + sep + re.sub(r"\b(left|right|top|bottom)\b", lambda m: MIRRORED_SIDES[m.group(1)], things)


def captions(scene: Scene) -> list[str]:
    """Every caption template that applies to the scene (3 to 7 strings), most generic first."""
    objs, bg = object_list(scene), background_phrase(scene)
    out = [objs, f"a photo of {objs}", f"{objs} on {bg}"]
    if len(scene.objects) == 2:
        sentence = relation_sentence(*scene.objects)
        out += [f"{sentence} on {bg}"] if sentence else []
    else:
        out += [
            s
            for s in (
                ordered_sentence(scene, "left of", "from left to right"),
                ordered_sentence(scene, "above", "from top to bottom"),
            )
            if s
        ]
    return out + [describe(scene)]
