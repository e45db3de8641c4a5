"""Unicode that cannot be encoded: JSON allows lone surrogates ("\\ud800"), UTF-8 and tokenizers do not.

Request text is checked once, after parsing (a 400 naming the field); text the server echoes back in an error
(a model name, a path) is made encodable so the error itself cannot fail.
"""

from __future__ import annotations

from pydantic import BaseModel

from .errors import invalid


def is_encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _first_bad(value: object, path: list[str]) -> tuple[list[str], str] | None:
    """(path, offending string) of the first string (or dict key) that UTF-8 cannot encode."""
    if isinstance(value, str):
        return None if is_encodable(value) else (path, value)
    if isinstance(value, dict):
        for key, item in value.items():
            key_path = [*path, str(key)]
            if isinstance(key, str) and not is_encodable(key):
                return key_path, key
            found = _first_bad(item, key_path)
            if found:
                return found
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            if isinstance(item, (str, dict, list, tuple)):  # token-id lists hold only ints: one cheap pass
                found = _first_bad(item, [*path, str(i)])
                if found:
                    return found
    return None


def check_text_fields(body: BaseModel) -> None:
    """400 naming the first field whose text is not valid Unicode (a lone surrogate)."""
    found = _first_bad(body.model_dump(by_alias=True, exclude_none=True), [])
    if found:
        path, text = found
        param = ".".join(path)
        bad = next(i for i, ch in enumerate(text) if not is_encodable(ch))
        raise invalid(
            f"Invalid value for '{param}': the text holds a lone surrogate (U+{ord(text[bad]):04X} at index {bad}), "
            "which is not valid Unicode",
            param,
            "invalid_unicode",
        )
