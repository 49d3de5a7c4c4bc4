"""Hypothesis strategies that build protobuf messages from their descriptors.

``messages(descriptor)`` draws any message of a type, field by field: strings
short, huge and unicode; doubles with NaN, infinities, 1e300 and negatives;
integers at and beyond the edges of what makes sense; bytes of any length;
repeated fields empty or long; nested messages the same way. ``mutants(valid)``
changes one to three fields of a valid message to such values, so that every
check behind the first one is reached too. ``wire(...)`` adds what is not a
message at all: raw garbage, and valid messages truncated or with bits flipped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

F = FieldDescriptor
INT64 = (-(2**63), 2**63 - 1)
INT32 = (-(2**31), 2**31 - 1)

# Lengths for strings and bytes: mostly small, some at the edges of a 4-byte
# element or a 128-character name, a few of megabytes (bytes: also just over
# the AP's tensor and message limits, 4 and 16 MiB).
SMALL_LENGTHS = st.one_of(st.integers(0, 64), st.sampled_from([127, 128, 129, 255, 256, 257, 1023, 1024]))


def _rarely(common: st.SearchStrategy[int], rare: Sequence[int]) -> st.SearchStrategy[int]:
    """``common``, or one of ``rare`` about one time in 40: big values cost memory and time."""
    return st.integers(0, 39).flatmap(lambda k: st.sampled_from(rare) if k == 0 else common)


STRING_LENGTHS = _rarely(SMALL_LENGTHS, [64 * 1024, 1024 * 1024 + 1])
BYTES_LENGTHS = _rarely(SMALL_LENGTHS, [1024 * 1024, 4 * 1024 * 1024 + 4, 16 * 1024 * 1024 + 1])

STRINGS = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", " ", "\x00", "..", "/", "-1", "nan", "digits\x00", "\u202e", "\U0001f600" * 3]),
    st.builds(lambda c, n: c * n, st.characters(exclude_categories=("Cs",)), STRING_LENGTHS),
)

DOUBLES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(
        [0.0, -0.0, 1.0, -1.0, 0.5, 1.0000001, math.nan, math.inf, -math.inf, 1e300, -1e300, 5e-324, 1e16]
    ),
)

BYTES = st.one_of(st.binary(max_size=64), st.builds(bytes, BYTES_LENGTHS))


def _integers(low: int, high: int) -> st.SearchStrategy[int]:
    edges = [low, low + 1, -1, 0, 1, 2, 3, 8, 9, 64, 65, 1 << 20, 1 << 31, high - 1, high]
    return st.one_of(st.integers(-3, 100), st.sampled_from([e for e in edges if low <= e <= high]))


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    t = field.type
    if t == F.TYPE_STRING:
        return STRINGS
    if t == F.TYPE_BYTES:
        return BYTES
    if t in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        return DOUBLES if t == F.TYPE_DOUBLE else st.floats(width=32, allow_nan=True, allow_infinity=True)
    if t in (F.TYPE_INT64, F.TYPE_SINT64, F.TYPE_SFIXED64):
        return _integers(*INT64)
    if t in (F.TYPE_INT32, F.TYPE_SINT32, F.TYPE_SFIXED32):
        return _integers(*INT32)
    if t in (F.TYPE_UINT64, F.TYPE_FIXED64):
        return _integers(0, 2**64 - 1)
    if t in (F.TYPE_UINT32, F.TYPE_FIXED32):
        return _integers(0, 2**32 - 1)
    if t == F.TYPE_BOOL:
        return st.booleans()
    if t == F.TYPE_ENUM:
        # proto3 enums are open: numbers nobody declared are legal on the wire.
        return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), _integers(*INT32))
    raise TypeError(f"{field.full_name}: no strategy for field type {t}")


Overrides = Mapping[str, st.SearchStrategy[Any]]
_NONE: Overrides = MappingProxyType({})


def field_values(
    field: FieldDescriptor, overrides: Overrides = _NONE, depth: int = 0
) -> st.SearchStrategy[Any]:
    """What ``field`` may hold: a value, or a list of them for a repeated field.

    ``overrides`` maps a field's full name (``apdispatch.v1.Tensor.datatype``)
    to a strategy for one value of it, for values that reach further than
    arbitrary ones (a task the AP knows).
    """
    one: st.SearchStrategy[Any]
    if field.full_name in overrides:
        one = st.one_of(overrides[field.full_name], _one(field, overrides, depth))
    else:
        one = _one(field, overrides, depth)
    if not field.is_repeated:
        return one
    if field.type == F.TYPE_MESSAGE:
        return st.lists(one, max_size=5)
    # Long lists of small values: a list of megabyte strings is only a big message.
    small = st.text(max_size=8) if field.type == F.TYPE_STRING else _scalar(field).filter(_small)
    return st.one_of(st.lists(one, max_size=4), st.lists(small, min_size=5, max_size=40))


def _small(value: Any) -> bool:
    return not isinstance(value, str | bytes) or len(value) <= 64


def _one(field: FieldDescriptor, overrides: Overrides, depth: int) -> st.SearchStrategy[Any]:
    if field.type == F.TYPE_MESSAGE:
        if depth >= 3:
            return st.just(_new(field.message_type))
        return messages(field.message_type, overrides, depth + 1)
    return _scalar(field)


def _new(descriptor: Descriptor) -> Message:
    return GetMessageClass(descriptor)()


def set_field(message: Message, field: FieldDescriptor, value: Any) -> None:
    target = getattr(message, field.name)
    if field.is_repeated:
        del target[:]
        if field.type == F.TYPE_MESSAGE:
            for item in value:
                target.add().CopyFrom(item)
        else:
            target.extend(value)
    elif field.type == F.TYPE_MESSAGE:
        target.CopyFrom(value)
    else:
        setattr(message, field.name, value)


def messages(
    descriptor: Descriptor, overrides: Overrides = _NONE, depth: int = 0
) -> st.SearchStrategy[Message]:
    """Any message of type ``descriptor``; each field is set or left unset."""

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        message = _new(descriptor)
        for field in descriptor.fields:
            if draw(st.booleans()):
                set_field(message, field, draw(field_values(field, overrides, depth)))
        return message

    return build()


def field_paths(message: Message) -> list[tuple[Message, FieldDescriptor]]:
    """Every field of ``message`` and of the messages inside it, with the message that holds it."""
    paths = []
    for field in message.DESCRIPTOR.fields:
        paths.append((message, field))
        if field.type != F.TYPE_MESSAGE:
            continue
        value = getattr(message, field.name)
        if field.is_repeated:
            for item in value:
                paths.extend(field_paths(item))
        elif message.HasField(field.name):
            paths.extend(field_paths(value))
    return paths


def mutants(valid: Sequence[Message], overrides: Overrides = _NONE) -> st.SearchStrategy[Message]:
    """A copy of one of ``valid`` with one to three of its fields (at any depth) changed."""

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        message = draw(st.sampled_from(valid))
        copy = _new(message.DESCRIPTOR)
        copy.CopyFrom(message)
        for _ in range(draw(st.integers(1, 3))):
            holder, field = draw(st.sampled_from(field_paths(copy)))
            set_field(holder, field, draw(field_values(field, overrides)))
        return copy

    return build()


def garbled(valid: Sequence[Message]) -> st.SearchStrategy[bytes]:
    """A valid message's wire bytes, truncated, with bytes flipped, or with bytes appended."""

    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        data = bytearray(draw(st.sampled_from(valid)).SerializeToString())
        how = draw(st.sampled_from(["truncate", "flip", "append"]))
        if how == "truncate" and data:
            del data[draw(st.integers(0, len(data) - 1)) :]
        elif how == "flip" and data:
            for _ in range(draw(st.integers(1, 8))):
                i = draw(st.integers(0, len(data) - 1))
                data[i] ^= draw(st.integers(1, 255))
        else:
            data += draw(st.binary(min_size=1, max_size=32))
        return bytes(data)

    return build()


def wire(
    descriptor: Descriptor, valid: Sequence[Message], overrides: Overrides = _NONE
) -> st.SearchStrategy[bytes]:
    """Bytes sent as one message: a generated message, a mutant of a valid one, garbled or raw garbage."""
    as_bytes: Callable[[Message], bytes] = lambda m: m.SerializeToString()  # noqa: E731
    return st.one_of(
        messages(descriptor, overrides).map(as_bytes),
        mutants(valid, overrides).map(as_bytes),
        mutants(valid, overrides).map(as_bytes),
        garbled(valid),
        st.binary(max_size=256),
    )
