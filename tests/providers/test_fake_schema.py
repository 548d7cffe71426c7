"""The fake model's JSON Schema instance generator: every instance validates (``jsonschema`` is the judge),
the same schema and seed give the same instance, and the keywords structured output uses are honoured."""

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runestone.providers.fake_schema import conforms, schema_instance

VALIDATOR = jsonschema.Draft202012Validator
FORMATS = ["date-time", "date", "time", "email", "uri", "hostname", "ipv4", "ipv6", "uuid"]


def valid(schema, value) -> bool:
    return VALIDATOR(schema, format_checker=VALIDATOR.FORMAT_CHECKER).is_valid(value)


@st.composite
def bounds(draw, kind):
    num = st.integers(-1000, 1000) if kind == "integer" else st.floats(-1000, 1000, allow_nan=False)
    out = {}
    lo, hi = sorted([draw(num), draw(num)])
    if draw(st.booleans()):
        out["minimum" if draw(st.booleans()) else "exclusiveMinimum"] = lo
    if draw(st.booleans()):
        key = "maximum" if draw(st.booleans()) else "exclusiveMaximum"
        # Keep room between exclusive bounds so the range is never empty.
        out[key] = hi + (2 if key.startswith("exclusive") or "exclusiveMinimum" in out else 0)
    if kind == "integer" and draw(st.booleans()) and "maximum" not in out and "exclusiveMaximum" not in out:
        out["multipleOf"] = draw(st.integers(1, 7))
    return {"type": kind, **out}


@st.composite
def string_schema(draw):
    out = {"type": "string"}
    if draw(st.booleans()):
        out["format"] = draw(st.sampled_from(FORMATS))
    else:
        lo = draw(st.integers(0, 30))
        if draw(st.booleans()):
            out["minLength"] = lo
        if draw(st.booleans()):
            out["maxLength"] = lo + draw(st.integers(0, 10))
    return out


LEAVES = st.one_of(
    string_schema(),
    bounds("integer"),
    bounds("number"),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.lists(st.one_of(st.integers(), st.text(max_size=5), st.booleans()), min_size=1, max_size=4, unique=True).map(lambda e: {"enum": e}),
    st.one_of(st.integers(), st.text(max_size=5)).map(lambda c: {"const": c}),
    st.just({}),
)
# oneOf branches of distinct types, so exactly one of them can match.
ONE_OF = st.lists(st.sampled_from(["string", "integer", "boolean", "null", "array", "object"]), min_size=2, max_size=4,
                  unique=True).map(lambda kinds: {"oneOf": [{"type": k} for k in kinds]})


def composite(children):
    names = st.text("abcdefgh_", min_size=1, max_size=6)
    obj = st.dictionaries(names, children, max_size=4).flatmap(lambda props: st.fixed_dictionaries({
        "type": st.just("object"),
        "properties": st.just(props),
        "required": st.lists(st.sampled_from(sorted(props)), unique=True) if props else st.just([]),
        "additionalProperties": st.booleans(),
    }))
    arr = st.tuples(children, st.integers(0, 3), st.integers(0, 3)).map(
        lambda t: {"type": "array", "items": t[0], "minItems": min(t[1], t[2]), "maxItems": max(t[1], t[2])})
    nullable = children.map(lambda c: {"anyOf": [c, {"type": "null"}]})
    multi = children.map(lambda c: {**c, "type": [c["type"], "null"]} if isinstance(c.get("type"), str) else c)
    return st.one_of(obj, arr, nullable, multi, ONE_OF, st.lists(children, min_size=1, max_size=3).map(lambda b: {"anyOf": b}))


SCHEMAS = st.recursive(LEAVES, composite, max_leaves=12)


@st.composite
def with_defs(draw):
    """A root object whose properties point into ``$defs``, as pydantic writes nested models."""
    defs = draw(st.dictionaries(st.sampled_from(["A", "B", "C"]), SCHEMAS, min_size=1, max_size=3))
    props = {f"p{name}": {"$ref": f"#/$defs/{name}"} for name in defs}
    return {"type": "object", "properties": props, "required": sorted(props), "additionalProperties": False, "$defs": defs}


@settings(max_examples=300, deadline=None)
@given(st.one_of(SCHEMAS, with_defs()), st.integers(0, 2**32))
def test_every_instance_validates_and_is_deterministic(schema, seed):
    value = schema_instance(schema, seed)
    assert valid(schema, value), (schema, value)
    assert schema_instance(schema, seed) == value
    assert conforms(schema, value)


def test_pydantic_style_schema_with_recursion_and_optional_fields():
    schema = {
        "$defs": {
            "Node": {"type": "object", "properties": {
                "name": {"type": "string", "minLength": 2, "maxLength": 8},
                "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}},
                "weight": {"anyOf": [{"type": "number", "exclusiveMinimum": 0, "maximum": 1}, {"type": "null"}], "default": None},
            }, "required": ["name", "children"], "additionalProperties": False},
            "Color": {"enum": ["red", "green", "blue"], "type": "string"},
        },
        "type": "object",
        "properties": {"root": {"$ref": "#/$defs/Node"}, "color": {"$ref": "#/$defs/Color"},
                       "when": {"type": "string", "format": "date-time"}, "id": {"type": "string", "format": "uuid"},
                       "pair": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "boolean"}], "items": False}},
        "required": ["root", "color", "when", "id", "pair"],
        "additionalProperties": False,
    }
    seen = set()
    for seed in range(20):
        value = schema_instance(schema, seed)
        assert valid(schema, value), value
        seen.add(value["color"])
        assert value["root"]["children"], "a recursive list is filled near the top"
        assert isinstance(value["root"]["weight"], float), "an optional field carries a value, not null"
    assert len(seen) > 1, "another seed, another enum member"


@pytest.mark.parametrize(("schema", "check"), [
    ({"type": "integer", "minimum": 10, "maximum": 10}, lambda v: v == 10),
    ({"type": "integer", "exclusiveMinimum": 3, "exclusiveMaximum": 5}, lambda v: v == 4),
    ({"type": "integer", "minimum": 1, "multipleOf": 5}, lambda v: v % 5 == 0 and v >= 5),
    ({"type": "number", "multipleOf": 0.25, "minimum": 1, "maximum": 2}, lambda v: 1 <= v <= 2 and (v * 4).is_integer()),
    ({"type": "string", "minLength": 40}, lambda v: len(v) >= 40),
    ({"type": "string", "maxLength": 2}, lambda v: len(v) <= 2),
    ({"type": "string", "format": "email"}, lambda v: v.endswith("@example.com")),
    ({"type": "array", "items": {"type": "string"}, "minItems": 5, "uniqueItems": True}, lambda v: len(set(v)) == 5),
    ({"const": {"a": [1]}}, lambda v: v == {"a": [1]}),
    ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, lambda v: isinstance(v, (int, float))),
    ({"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                {"properties": {"b": {"type": "boolean"}}, "required": ["b"]}]}, lambda v: set(v) == {"a", "b"}),
    ({"type": ["null", "integer"]}, lambda v: isinstance(v, int)),
])
def test_keywords(schema, check):
    for seed in range(8):
        value = schema_instance(schema, seed)
        assert valid(schema, value) and check(value), value
