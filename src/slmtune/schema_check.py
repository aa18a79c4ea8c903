"""The tool contract's one home: the offered tools as {name: parameters} (`tool_params`) and the one JSON-Schema
validator of the house. Curate, eval and `slmtune serve`'s guard check tool arguments and extraction objects with
it, and render orders arguments by the same map, so a schema means the same thing at every stage. (It sits below
every stage, not in `slmtune.infer`, because curate — a data stage — and render need it too.)

* **One pinned draft**, Draft 7, whatever a schema's `$schema` says: it covers what tool schemas use and
  validates ~2x faster than 2020-12 (`$defs` refs still resolve: a local ref is a JSON pointer).
* **Nothing leaves the process.** Schemas come from requests and logs, which are untrusted. jsonschema's default
  registry fetches any `$ref` it cannot resolve with `urlopen` (http:// and file:// alike, no timeout); here the
  registry is empty, so such a ref is unresolvable, never fetched. `schema_problem` refuses a `$ref` that does not
  start with `#` up front, so a request naming one gets a 400 before anything validates against it.
* **Every way a schema can fail is one exception**, `SchemaProblem`: not a schema of the draft, a `$ref` that
  leaves the document or does not resolve, a `$ref` cycle, nesting deeper than `MAX_DEPTH`. Callers choose what
  a broken schema means: the guard sends the answer upstream (`schema_invalid`), curate keeps the call.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

MAX_DEPTH = 64  # nested schema objects/arrays: real tool schemas stay under ~10
_CACHE: OrderedDict[str, Any] = OrderedDict()  # canonical schema JSON -> validator (or SchemaProblem)
_CACHE_SIZE = 1024


class SchemaProblem(ValueError):
    """A schema that cannot be used to check anything (see module docstring)."""


def tool_params(tools: Any) -> dict[str, Any]:
    """{tool name: its `parameters` schema (None when it has none)} of offered tools — the one map of the tool
    contract that render, curate, eval and the guard all read. Takes OpenAI's `{type, function: {name,
    parameters}}` or a bare `{name, parameters}`; entries without a string name are skipped."""
    out: dict[str, Any] = {}
    for t in tools if isinstance(tools, list) else []:
        fn = t.get("function", t) if isinstance(t, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            out[fn["name"]] = fn.get("parameters")
    return out


def schema_problem(schema: Any) -> str | None:
    """Why `schema` can't be used, as a short phrase; None when it can."""
    try:
        _validator(schema)
    except SchemaProblem as e:
        return str(e)
    return None


def validation_error(value: Any, schema: Any) -> str | None:
    """The first way `value` breaks `schema` ("path: message"), None when it fits or there is no schema.
    Raises `SchemaProblem` when the schema itself can't be used."""
    if schema is None or schema == {} or schema is True:
        return None
    validator = _validator(schema)
    try:
        error = next(iter(validator.iter_errors(value)), None)
    except RecursionError:
        raise SchemaProblem("the schema's $refs loop, or the value nests too deep to check") from None
    except Exception as e:  # noqa: BLE001 - referencing.Unresolvable and whatever a hostile schema trips over
        raise SchemaProblem(f"the schema could not be applied ({type(e).__name__}: {str(e)[:120]})") from None
    if error is None:
        return None
    where = "/".join(map(str, error.absolute_path)) or "(root)"
    return f"{where}: {error.message[:160]}"


def is_valid(value: Any, schema: Any, *, broken: bool) -> bool:
    """Whether `value` fits `schema`; `broken` is the answer when the schema can't be used."""
    try:
        return validation_error(value, schema) is None
    except SchemaProblem:
        return broken


def _validator(schema: Any):
    key = _key(schema)
    hit = _CACHE.get(key)
    if hit is None:
        hit = _build(schema)
        _CACHE[key] = hit
        if len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    if isinstance(hit, SchemaProblem):
        raise hit
    return hit


def _key(schema: Any) -> str:
    try:
        return json.dumps(schema, sort_keys=True, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        raise SchemaProblem("the schema is not plain JSON") from None


def _build(schema: Any) -> Any:
    """The validator, or the SchemaProblem to raise (cached either way: a bad schema is judged once)."""
    import jsonschema
    from referencing import Registry

    if not isinstance(schema, (dict, bool)):
        return SchemaProblem(f"a schema must be an object, got {type(schema).__name__}")
    problem = _structure_problem(schema)
    if problem:
        return SchemaProblem(problem)
    try:
        jsonschema.Draft7Validator.check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(map(str, e.absolute_path))
        return SchemaProblem(f"not a JSON Schema ({where + ': ' if where else ''}{e.message[:160]})")
    except RecursionError:
        return SchemaProblem(f"the schema nests deeper than {MAX_DEPTH} levels")
    return jsonschema.Draft7Validator(schema, registry=Registry())


def _structure_problem(schema: Any) -> str | None:
    """Nesting deeper than MAX_DEPTH, or a `$ref` that leaves the document or points nowhere in it (checked
    without recursion)."""
    stack, refs, ids = [(schema, 1)], [], 0
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            return f"the schema nests deeper than {MAX_DEPTH} levels"
        if isinstance(node, dict):
            ref = node.get("$ref")
            if ref is not None and not (isinstance(ref, str) and ref.startswith("#")):
                return f"$ref {str(ref)[:80]!r} leaves the schema: only local refs (#/...) are allowed"
            refs += [ref] if ref is not None else []
            ids += "$id" in node and node is not schema
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)
    if ids:  # a nested $id moves what `#/...` means below it: left to the validator (it still fetches nothing)
        return None
    missing = next((r for r in refs if not _resolves(schema, r)), None)
    return f"$ref {missing[:80]!r} points nowhere in the schema" if missing is not None else None


def _resolves(schema: Any, ref: str) -> bool:
    """Whether a local `#/a/b` ref names a node of `schema` (JSON pointer, ~0 ~1 and %-escapes)."""
    from urllib.parse import unquote

    node = schema
    for part in unquote(ref[1:]).split("/")[1:]:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return True
