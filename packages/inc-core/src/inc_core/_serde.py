"""JSON round trip for the frozen config dataclasses.

Each config serialises as ``{"type": <name>, "version": <int>, ...fields}`` so a tuned result
saved today can be reapplied later and an unknown or newer payload is rejected clearly.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from inc_core.errors import ConfigError

T = TypeVar("T", bound="SerializableConfig")

_REGISTRY: dict[str, type[SerializableConfig]] = {}


def _encode(value: Any) -> Any:
    if isinstance(value, SerializableConfig):
        return value.to_dict()
    if isinstance(value, Mapping):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_encode(v) for v in value]
    return value


class SerializableConfig:
    """Mixin for frozen dataclass configs: ``to_dict``/``from_dict``/``to_json``/``from_json``."""

    VERSION: ClassVar[int] = 1

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _REGISTRY[cls.__name__] = cls

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict with a ``type`` tag and a ``version``."""
        out: dict[str, Any] = {"type": type(self).__name__, "version": self.VERSION}
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            out[field.name] = _encode(getattr(self, field.name))
        return out

    @classmethod
    def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
        """Rebuild a config from :meth:`to_dict` output; the constructor re-validates every field."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{cls.__name__}.from_dict expects a mapping, got {type(data).__name__}.")
        payload = dict(data)
        tag = payload.pop("type", cls.__name__)
        version = payload.pop("version", cls.VERSION)
        if tag != cls.__name__:
            raise ConfigError(
                f"Cannot load a {tag!r} payload as {cls.__name__}; pass it to {tag}.from_dict instead."
            )
        if not isinstance(version, int) or version > cls.VERSION:
            raise ConfigError(
                f"{cls.__name__} payload has version {version!r}; this inc reads versions <= {cls.VERSION}. "
                "Upgrade inc-core to read it."
            )
        names = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(payload) - set(names))
        if unknown:
            raise ConfigError(
                f"{cls.__name__} has no field(s) {unknown}; valid fields are {sorted(names)}."
            )
        kwargs = {k: cls._decode_field(k, v) for k, v in payload.items()}
        return cls(**kwargs)

    @classmethod
    def _decode_field(cls, name: str, value: Any) -> Any:
        """Nested configs come back from their type tag; subclasses override for other field types."""
        if isinstance(value, Mapping) and value.get("type") in _REGISTRY:
            return _REGISTRY[value["type"]].from_dict(value)
        return value

    def to_json(self) -> str:
        """Canonical JSON (sorted keys): equal configs give equal strings."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls: type[T], text: str) -> T:
        """Inverse of :meth:`to_json`."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{cls.__name__}.from_json: not valid JSON ({exc}).") from exc
        return cls.from_dict(data)
