"""What every policies parser shares (policy YAML, cluster YAML, the FIFO clock's settings): the
number check and the YAML reader."""

from __future__ import annotations

import math
import numbers
import re
from pathlib import Path

import yaml


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``1.2e9`` and ``2e-4`` as numbers as YAML 1.2 does (YAML 1.1
    wants a dot and a signed exponent, ``1.2e+9``, and gave a string an admin did not mean), and
    refusing a key given twice in one mapping (PyYAML keeps the last: ``margin: 0.1`` then
    ``margin: 0.9`` silently gave 0.9)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: dict[object, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: PyYAML merges it afterwards
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the base constructor reports it
                    continue
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} given twice (line {first} and line "
                        f"{key_node.start_mark.line + 1}); keep one", key_node.start_mark)  # fmt: skip
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_yaml(path: str | Path, error: type[Exception]) -> object:
    """The document of a YAML file; ``error(message)`` naming the file for anything unreadable:
    a missing file, bytes that are not UTF-8, bad YAML, an integer past Python's 4,300 digits, or
    nesting too deep to parse."""
    try:
        loader = _Loader(Path(path).read_text(encoding="utf-8"))  # a SafeLoader
        loader.name = str(path)  # marks name the file, not "<unicode string>"
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except OSError as err:
        raise error(f"{path}: cannot read: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise error(f"{path}: not valid UTF-8: {err.reason} at byte {err.start}") from None
    except yaml.MarkedYAMLError as err:
        raise error(f"{path}: {yaml_problem(err)}") from None
    except (yaml.YAMLError, ValueError, RecursionError) as err:
        text = " ".join(str(err).split()) or type(err).__name__
        raise error(f"{path}: not valid YAML: {text}") from None


def yaml_problem(err: yaml.MarkedYAMLError) -> str:
    """One line for PyYAML's multi-line error: ``line L, column C: not valid YAML: problem (context
    at line K)``, without its quote of the text and its caret."""
    mark = err.problem_mark or err.context_mark
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = " ".join(str(err.problem or err.context or "").split())
    if err.problem and err.context:
        at = f" at line {err.context_mark.line + 1}" if err.context_mark is not None else ""
        problem += f" ({' '.join(err.context.split())}{at})"
    return f"{where}not valid YAML: {problem or type(err).__name__}"


def finite_number(value: object) -> float | None:
    """``value`` as a float when it is a finite real number (not a bool; numpy's and ``Fraction``
    count), else None: a string, None, NaN, an infinity, or an int beyond any float (YAML and Python
    ints have no limit)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None
